"""The standalone DiT forward benchmark (bench/engine/CMakeLists.txt) is built only on the GPU
machine and lists the engine sources it compiles by hand. When one of them starts to call into an
engine source that is not listed, its link breaks without any CI build noticing (it happened when
the trainer added activation checkpointing). This test is that link check on the CI build's
objects: every project symbol (namespace sparge) that a listed source's object leaves undefined
must be defined by the object of another listed source."""
import os
import re
import subprocess

SRC = os.environ.get("SPARGE_SOURCE_DIR", os.path.join(os.path.dirname(__file__), "..", ".."))
BUILD = os.environ.get("SPARGE_BUILD_DIR", os.path.join(SRC, "build"))
CMAKE = os.path.join(SRC, "bench", "engine", "CMakeLists.txt")
OBJ_DIR = os.path.join(BUILD, "engine", "CMakeFiles", "sparge_engine.dir")


def listed_engine_sources():
    text = open(CMAKE).read()
    block = re.search(r"add_executable\(\s*dit_forward_bench(.*?)\)", text, re.S)
    assert block, "add_executable(dit_forward_bench ...) not found in " + CMAKE
    return sorted(t[len("${REPO}/engine/"):] for t in block.group(1).split() if t.startswith("${REPO}/engine/"))


def symbols(source, which):
    obj = os.path.join(OBJ_DIR, source + ".o")
    assert os.path.exists(obj), f"{obj} is missing: is {source} still a source of sparge_engine?"
    out = subprocess.run(["nm", "-C", which, obj], check=True, capture_output=True, text=True).stdout
    syms = set()
    for line in out.splitlines():
        parts = line.split(None, 2) if which == "--defined-only" else line.split(None, 1)
        name = parts[-1]
        if name.startswith("sparge::"):
            syms.add(name)
    return syms


def unresolved(sources):
    defined = set().union(*(symbols(s, "--defined-only") for s in sources))
    needed = set().union(*(symbols(s, "--undefined-only") for s in sources))
    return sorted(needed - defined)


def test_listed_engine_sources_link_on_their_own():
    sources = listed_engine_sources()
    assert "models/wan_dit.cc" in sources
    missing = unresolved(sources)
    assert not missing, ("bench/engine/CMakeLists.txt misses the engine sources defining these "
                         f"symbols (the GPU machine's link of dit_forward_bench would fail): {missing}")


def test_the_check_catches_a_dropped_source():
    sources = [s for s in listed_engine_sources() if s != "models/activation_checkpoint.cc"]
    assert any("CheckpointedCall" in s for s in unresolved(sources))
