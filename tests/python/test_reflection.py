"""A client that knows nothing but the server's address: it discovers sparge.v1.VideoService via
gRPC server reflection (no generated stubs), builds requests from the reflected descriptors and
drives every RPC: Generate (file checked with ffprobe), GetServerInfo and the job API (SubmitJob,
GetJob, WatchJob, CancelJob, ListJobs, GetJobResult). A second test kills a server with SIGKILL
mid-job and checks that a new server on the same job directory serves the old result and reports
the killed job FAILED "interrupted".

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

    def __init__(self, output_dir):
        self.log = []
        self.proc = subprocess.Popen(
            [SERVER_BIN, "--config", str(SOURCE_DIR / "config/server.yaml"), "--port", "0",
             "--metrics-port", "0", "--device", "cpu", "--listen-address", "127.0.0.1",
             "--output-dir", str(output_dir)],
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
def output_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("jobs")


@pytest.fixture(scope="module")
def server(output_dir):
    if not os.path.exists(SERVER_BIN):
        pytest.fail(f"sparge-server not built: {SERVER_BIN}")
    s = Server(output_dir)
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
        self.channel = channel
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

        self.called = set()

    def enum_value(self, enum_name, value_name):
        return self.pool.FindEnumTypeByName(enum_name).values_by_name[value_name].number

    def message(self, full_name, **fields):
        """A message of the reflected type `full_name` (e.g. "sparge.v1.GetJobRequest")."""
        return message_factory.GetMessageClass(self.pool.FindMessageTypeByName(full_name))(**fields)

    def call(self, method_name, request, timeout=60):
        """Calls any VideoService method by name: the response, or an iterator for streams."""
        method = self.service.methods_by_name[method_name]
        response_class = message_factory.GetMessageClass(method.output_type)
        path = f"/sparge.v1.VideoService/{method_name}"
        factory = self.channel.unary_stream if method.server_streaming else self.channel.unary_unary
        stub = factory(path, request_serializer=lambda m: m.SerializeToString(),
                       response_deserializer=response_class.FromString)
        self.called.add(method_name)
        return stub(request, timeout=timeout)

    def job_state(self, name):
        return self.enum_value("sparge.v1.JobState", "JOB_STATE_" + name)


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


def small_request(api, prompt, steps=2, **extra):
    return api.Request(prompt=prompt, width=64, height=64, num_frames=5, num_steps=steps, seed=3,
                       **extra)


def wait_final(api, job_id, timeout_s=120):
    deadline = time.monotonic() + timeout_s
    final = {api.job_state(s) for s in ("SUCCEEDED", "FAILED", "CANCELLED", "DEADLINE_EXCEEDED")}
    while True:
        job = api.call("GetJob", api.message("sparge.v1.GetJobRequest", job_id=job_id))
        if job.state in final:
            return job
        assert time.monotonic() < deadline, f"job {job_id} did not finish: {job}"
        time.sleep(0.05)


def download(api, job_id, offset=0):
    data, total, content_type = bytearray(), None, None
    for chunk in api.call("GetJobResult", api.message("sparge.v1.GetJobResultRequest",
                                                      job_id=job_id, offset=offset)):
        assert chunk.offset == offset + len(data)
        data += chunk.data
        total, content_type = chunk.total_size_bytes, chunk.content_type
    return bytes(data), total, content_type


def ffprobe_frames(path):
    probe = subprocess.run(
        ["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries",
         "stream=codec_name,nb_read_frames", "-of", "json", str(path)],
        capture_output=True, text=True, check=True)
    stream = json.loads(probe.stdout)["streams"][0]
    return stream["codec_name"], int(stream["nb_read_frames"])


def test_every_rpc_through_reflection(channel, output_dir, tmp_path):
    api = Reflected(channel)
    info = api.call("GetServerInfo", api.message("sparge.v1.GetServerInfoRequest"))
    assert info.ready
    list(api.call("Generate", small_request(api, "a warm-up clip", steps=1)))

    submit = api.message("sparge.v1.SubmitJobRequest", request=small_request(api, "a red kite"),
                         idempotency_key="reflection-1")
    job = api.call("SubmitJob", submit)
    assert job.job_id and job.request.seed == 3
    assert job.origin == api.enum_value("sparge.v1.JobOrigin", "JOB_ORIGIN_SUBMIT_JOB")
    assert api.call("SubmitJob", submit).job_id == job.job_id  # idempotent retry

    kinds, completed = [], None
    for event in api.call("WatchJob", api.message("sparge.v1.WatchJobRequest",
                                                  job_id=job.job_id)):
        kinds.append(event.WhichOneof("event"))
        if kinds[-1] == "completed":
            completed = event.completed
    assert kinds[0] == "accepted" and kinds[-1] == "completed" and "chunk" not in kinds

    done = wait_final(api, job.job_id)
    assert done.state == api.job_state("SUCCEEDED")
    assert done.result.size_bytes == completed.file_size_bytes
    data, total, content_type = download(api, job.job_id)
    assert (len(data), total, content_type) == (completed.file_size_bytes, len(data), "video/mp4")
    assert data == (output_dir / f"{job.job_id}.mp4").read_bytes()
    assert download(api, job.job_id, offset=100)[0] == data[100:]
    path = tmp_path / "job.mp4"
    path.write_bytes(data)
    assert ffprobe_frames(path) == ("h264", 5)

    listed = api.call("ListJobs", api.message("sparge.v1.ListJobsRequest", page_size=1,
                                              states=[api.job_state("SUCCEEDED")]))
    assert [j.job_id for j in listed.jobs] == [job.job_id]  # newest first
    assert listed.next_page_token  # the Generate job above is the next page
    second = api.call("ListJobs", api.message("sparge.v1.ListJobsRequest", page_size=1,
                                              page_token=listed.next_page_token,
                                              states=[api.job_state("SUCCEEDED")]))
    assert second.jobs[0].origin == api.enum_value("sparge.v1.JobOrigin", "JOB_ORIGIN_GENERATE")

    # CancelJob on a long job: it answers once the job has stopped.
    long_job = api.call("SubmitJob", api.message(
        "sparge.v1.SubmitJobRequest", request=small_request(api, "a long one", steps=100)))
    cancelled = api.call("CancelJob", api.message("sparge.v1.CancelJobRequest",
                                                  job_id=long_job.job_id))
    assert cancelled.state == api.job_state("CANCELLED")
    assert cancelled.error.code_name == "CANCELLED"
    again = api.call("CancelJob", api.message("sparge.v1.CancelJobRequest", job_id=job.job_id))
    assert again.state == api.job_state("SUCCEEDED")  # finished: left as it is

    with pytest.raises(grpc.RpcError) as error:
        api.call("GetJob", api.message("sparge.v1.GetJobRequest", job_id="job-0-00000000"))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as error:
        download(api, long_job.job_id)
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert health(channel) == 1

    assert api.called == set(api.service.methods_by_name), "an RPC is not exercised"


def test_killed_server_restarts_with_results_and_interrupted_jobs(tmp_path):
    jobs_dir = tmp_path / "jobs"
    first = Server(jobs_dir)
    try:
        first.wait_ready()
        with grpc.insecure_channel(f"127.0.0.1:{first.port}") as ch:
            api = Reflected(ch)
            done = api.call("SubmitJob", api.message(
                "sparge.v1.SubmitJobRequest", request=small_request(api, "kept", steps=1)))
            assert wait_final(api, done.job_id).state == api.job_state("SUCCEEDED")
            data, _, _ = download(api, done.job_id)
            running = api.call("SubmitJob", api.message(
                "sparge.v1.SubmitJobRequest",
                request=api.Request(prompt="killed", num_steps=100, seed=1)))
            deadline = time.monotonic() + 60
            while api.call("GetJob", api.message("sparge.v1.GetJobRequest",
                                                 job_id=running.job_id)).state != \
                    api.job_state("RUNNING"):
                assert time.monotonic() < deadline
                time.sleep(0.01)
    finally:
        first.proc.kill()  # SIGKILL: no chance to record anything
        first.proc.wait()

    second = Server(jobs_dir)
    try:
        second.wait_ready()
        with grpc.insecure_channel(f"127.0.0.1:{second.port}") as ch:
            api = Reflected(ch)
            killed = api.call("GetJob", api.message("sparge.v1.GetJobRequest",
                                                    job_id=running.job_id))
            assert killed.state == api.job_state("FAILED")
            assert killed.error.message.startswith("interrupted")
            assert download(api, done.job_id)[0] == data
    finally:
        assert second.stop() == 0, "".join(second.log)
