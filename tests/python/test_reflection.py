"""A client that knows nothing but the server's address: it discovers sparge.v1.VideoService via
gRPC server reflection (no generated stubs), builds a GenerateRequest from the reflected
descriptors, streams Generate, reassembles the file and checks it with ffprobe.

Runs sparge-server (SPARGE_SERVER_BIN) with the embedded tiny model on CPU and a free port.
"""

import json
import os
import pathlib
import re
import signal
import subprocess
import tempfile
import threading
import time

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

SOURCE_DIR = pathlib.Path(os.environ.get("SPARGE_SOURCE_DIR", pathlib.Path(__file__).parents[2]))
SERVER_BIN = os.environ.get("SPARGE_SERVER_BIN", str(SOURCE_DIR / "build/server/sparge-server"))
READY_TIMEOUT_S = 300


class Server:
    """sparge-server on port 0; the bound port is read from its log."""

    def __init__(self):
        self.log = []
        self.proc = subprocess.Popen(
            [SERVER_BIN, "--config", str(SOURCE_DIR / "config/server.yaml"), "--port", "0",
             "--metrics-port", "0", "--device", "cpu", "--listen-address", "127.0.0.1"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.port = None
        self.ready = threading.Event()
        self.port_known = threading.Event()
        self.reader = threading.Thread(target=self._read_log, daemon=True)
        self.reader.start()

    def _read_log(self):
        for line in self.proc.stdout:
            self.log.append(line)
            match = re.search(r"\(port (\d+)\)", line)
            if match and self.port is None:
                self.port = int(match.group(1))
                self.port_known.set()
            if "ready:" in line:
                self.ready.set()

    def wait_ready(self):
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self.ready.is_set():
            assert self.proc.poll() is None, "server exited:\n" + "".join(self.log)
            assert time.monotonic() < deadline, "server not ready:\n" + "".join(self.log)
            self.ready.wait(0.2)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


@pytest.fixture(scope="module")
def server():
    if not os.path.exists(SERVER_BIN):
        pytest.fail(f"sparge-server not built: {SERVER_BIN}")
    s = Server()
    s.wait_ready()
    yield s
    code = s.stop()
    assert code == 0, "unclean exit %s:\n%s" % (code, "".join(s.log))


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


def health(channel, service=""):
    """grpc.health.v1.Health/Check with hand-encoded bytes (no stubs): returns the status enum."""
    request = b"" if not service else b"\x0a" + bytes([len(service)]) + service.encode()
    check = channel.unary_unary("/grpc.health.v1.Health/Check",
                                request_serializer=lambda b: b, response_deserializer=lambda b: b)
    response = check(request, timeout=10)
    return response[1] if len(response) >= 2 and response[0] == 0x08 else 0


class Reflected:
    """Message classes of sparge.v1.VideoService, built from reflected descriptors only."""

    def __init__(self, channel):
        self.db = ProtoReflectionDescriptorDatabase(channel)
        self.pool = descriptor_pool.DescriptorPool(self.db)
        self.service = self.pool.FindServiceByName("sparge.v1.VideoService")
        generate = self.service.methods_by_name["Generate"]
        assert generate.server_streaming and not generate.client_streaming
        self.Request = message_factory.GetMessageClass(generate.input_type)
        self.Event = message_factory.GetMessageClass(generate.output_type)
        self.generate = channel.unary_stream(
            "/sparge.v1.VideoService/Generate",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=self.Event.FromString)

    def enum_value(self, enum_name, value_name):
        return self.pool.FindEnumTypeByName(enum_name).values_by_name[value_name].number


def test_reflection_lists_services(channel):
    services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert "sparge.v1.VideoService" in services
    assert "grpc.health.v1.Health" in services
    assert health(channel) == 1  # SERVING
    assert health(channel, "sparge.v1.VideoService") == 1


def test_generate_through_reflection_gives_a_valid_mp4(channel, tmp_path):
    api = Reflected(channel)
    request = api.Request(prompt="a paper boat drifting on a pond", width=128, height=96,
                          num_frames=9, num_steps=2, seed=3)
    request.output_format = api.enum_value("sparge.v1.OutputFormat", "OUTPUT_FORMAT_MP4")
    request.sparsity.mode = api.enum_value("sparge.v1.AttentionMode", "ATTENTION_MODE_HYBRID")
    request.sparsity.topk = 0.5
    request.sparsity.topp = 0.8

    kinds, data, completed, steps = [], bytearray(), None, []
    for event in api.generate(request, timeout=300):
        kind = event.WhichOneof("event")
        kinds.append(kind)
        if kind == "progress" and event.progress.step > 0:
            steps.append(event.progress.step)
            assert 0.0 <= event.progress.achieved_sparsity <= 1.0
        elif kind == "chunk":
            assert event.chunk.offset == len(data)
            data += event.chunk.data
        elif kind == "completed":
            completed = event.completed
    assert kinds[0] == "accepted"
    assert kinds[-1] == "completed"
    order = {"accepted": 0, "progress": 1, "chunk": 2, "completed": 3}
    assert [order[k] for k in kinds] == sorted(order[k] for k in kinds)
    assert max(steps) == 2
    assert completed.content_type == "video/mp4"
    assert completed.file_size_bytes == len(data)
    assert (completed.width, completed.height, completed.num_frames) == (128, 96, 9)

    path = tmp_path / "out.mp4"
    path.write_bytes(bytes(data))
    probe = subprocess.run(
        ["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries",
         "stream=codec_name,width,height,nb_read_frames", "-of", "json", str(path)],
        capture_output=True, text=True, check=True)
    stream = json.loads(probe.stdout)["streams"][0]
    assert stream["codec_name"] == "h264"
    assert (stream["width"], stream["height"]) == (128, 96)
    assert int(stream["nb_read_frames"]) == 9


def test_bad_request_is_invalid_argument_and_server_keeps_serving(channel):
    api = Reflected(channel)
    with pytest.raises(grpc.RpcError) as error:
        list(api.generate(api.Request(prompt="x", width=17), timeout=30))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "width: must be a multiple of 16" in error.value.details()
    assert health(channel) == 1
