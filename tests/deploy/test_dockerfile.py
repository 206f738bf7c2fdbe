"""The Dockerfile stays in step with scripts/setup.sh and scripts/requirements.txt: it installs the
project's packages only through setup.sh (so the lists cannot fork), pins nothing differently, and
its CUDA series, Debian release and ports match the torch wheel, setup.sh and the server config."""
import importlib.metadata
import re

import yaml

from deploy_lib import SOURCE_DIR, find_k8s_container

DOCKERFILE = (SOURCE_DIR / "Dockerfile").read_text()
SETUP = (SOURCE_DIR / "scripts/setup.sh").read_text()
REQUIREMENTS = (SOURCE_DIR / "scripts/requirements.txt").read_text()


def stages():
    """{stage name: text} of the multi-stage Dockerfile."""
    parts = re.split(r"^FROM\s+\S+\s+AS\s+(\w+)\s*$", DOCKERFILE, flags=re.M | re.I)
    return dict(zip(parts[1::2], parts[2::2]))


def logical_lines(text):
    return re.sub(r"\\\n", " ", text).splitlines()


def setup_apt_packages():
    body = re.search(r"APT_PACKAGES=\((.*?)\)", SETUP, re.S).group(1)
    return set(re.sub(r"#.*", "", body).split())


def requirement_pins():
    pins = {}
    for line in REQUIREMENTS.splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower()] = version
    return pins


def apt_installs(text):
    """Packages named by `apt-get install` in a stage (options and shell words after && dropped)."""
    pkgs = set()
    for line in logical_lines(text):
        for cmd in re.split(r"&&|;|\|", line):
            m = re.search(r"apt-get\s+install\s+(.*)", cmd)
            if m:
                pkgs |= {w for w in m.group(1).split() if not w.startswith("-")}
    return pkgs


def test_build_stage_installs_project_packages_only_through_setup_sh():
    build = stages()["build"]
    assert re.search(r"^COPY\s+scripts/setup\.sh\s+scripts/requirements\.txt\s+scripts/\s*$",
                     build, re.M), "setup.sh and its inputs must be copied before it runs"
    assert any(line.startswith("RUN") and "bash scripts/setup.sh" in line
               for line in logical_lines(build))
    # setup.sh reads nothing else from the tree.
    assert set(re.findall(r"scripts/[\w.]+", SETUP)) <= {"scripts/setup.sh",
                                                         "scripts/requirements.txt"}
    extra = apt_installs(build) - setup_apt_packages()
    # Only the CUDA toolkit (absent from Debian) and what fetching its apt key needs.
    assert all(p.startswith("cuda-") or p in {"ca-certificates", "curl", "gnupg"}
               for p in extra), extra
    # No pip install outside setup.sh, so no second set of Python pins.
    assert not re.search(r"pip\d?\s+install|pip\s+install", DOCKERFILE)


def test_no_version_differs_from_setup():
    pins = requirement_pins()
    for name, version in re.findall(r"\b([A-Za-z][\w.-]*)==([\w.+-]+)", DOCKERFILE):
        assert pins.get(name.lower()) == version, f"Dockerfile pins {name}=={version}"
    for stage, text in stages().items():
        pinned = [p for p in apt_installs(text) if "=" in p]
        assert not pinned, f"{stage} stage pins Debian packages {pinned}; pin them in setup.sh"


def test_cuda_series_matches_the_pinned_torch_wheel():
    torch_pin = requirement_pins()["torch"]
    installed = importlib.metadata.version("torch")
    assert installed.split("+")[0] == torch_pin, "the venv's torch differs from requirements.txt"
    cuda = [r for r in importlib.metadata.requires("torch") if r.startswith("nvidia-")]
    majors = {m for r in cuda for m in re.findall(r"-cu(\d+)\b", r)}
    assert len(majors) == 1, cuda
    major = majors.pop()
    import torch  # noqa: PLC0415 (only the CUDA minor version needs the module)
    wheel_cuda = torch.version.cuda or ""
    assert wheel_cuda.split(".")[0] == major, (wheel_cuda, cuda)
    series = set(re.findall(r"\bcuda-[a-z-]+?-(\d+)-(\d+)\b", DOCKERFILE))
    assert series == {tuple(wheel_cuda.split(".")[:2])}, (series, wheel_cuda)
    assert f'NVIDIA_REQUIRE_CUDA="cuda>={wheel_cuda}"' in DOCKERFILE


def test_debian_release_matches_setup():
    assert "Debian 12" in SETUP
    assert re.search(r"^ARG DEBIAN_RELEASE=bookworm$", DOCKERFILE, re.M)
    for url in re.findall(r"https://developer\.download\.nvidia\.com/\S+", DOCKERFILE):
        assert "/debian12/" in url, url


def test_ports_and_user_match_config_and_kubernetes():
    cfg = yaml.safe_load((SOURCE_DIR / "config/server.yaml").read_text())
    exposed = set(re.search(r"^EXPOSE\s+(.*)$", DOCKERFILE, re.M).group(1).split())
    assert exposed == {str(cfg["port"]), str(cfg["metrics_port"])}
    cmd = re.search(r"^CMD\s+(\[.*?\])", DOCKERFILE, re.M | re.S).group(1)
    assert f'"--port", "{cfg["port"]}"' in cmd and f'"--metrics-port", "{cfg["metrics_port"]}"' in cmd
    uid = int(re.search(r"useradd .*--uid (\d+)", DOCKERFILE).group(1))
    pod, container = find_k8s_container()
    assert pod["securityContext"]["runAsUser"] == uid
    assert re.search(r"^USER sparge$", DOCKERFILE, re.M)
    assert 'VOLUME ["/models"]' in DOCKERFILE
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/models", "/etc/sparge"}
    assert "/etc/sparge/server.yaml" in DOCKERFILE


def test_runtime_stage_installs_only_what_the_binaries_load():
    runtime = stages()["runtime"]
    # The list itself is computed from ldd of the built binaries in the build stage.
    assert "xargs -a /tmp/sparge-runtime-packages apt-get install" in runtime
    assert apt_installs(runtime) == {"tini"}


def test_trainer_ships_in_the_image():
    build = stages()["build"]
    # The build fails when the trainer binary is missing: checked, then copied without `|| true`.
    assert re.search(r"test -x build/trainer/sparge-train\b", build)
    copies = [line for line in logical_lines(build)
              if re.match(r"\s*cp\b.*\bbuild/trainer/sparge-train\b.*\s/dist/usr/local/bin/?\s*$",
                          line)]
    assert copies, "build/trainer/sparge-train is not copied to /usr/local/bin"
    assert not re.search(r"find build/trainer", build)
    assert re.search(r"^cp config/trainer\.yaml /dist/etc/sparge/trainer\.yaml$", build, re.M)
