"""deploy/kubernetes/training: the sparge-train Job, its ConfigMap, output volume and headless
Service validate against the Kubernetes 1.37 schemas (strict, offline), stay out of the serving
kustomization, and agree with config/trainer.yaml, sparge-train's flags, the models volume and the
patch that lets the servers load checkpoints."""
import copy
import os
import shutil
import subprocess
from pathlib import Path, PurePosixPath

import pytest
import yaml

from deploy_lib import K8S, SOURCE_DIR, load_yaml_docs
from test_manifests import kustomized, validate

TRAINING = K8S / "training"
PATCH = TRAINING / "serve-checkpoints-patch.yaml"


def training_manifests():
    return sorted(p for p in TRAINING.glob("*.yaml")
                  if p.name not in {"kustomization.yaml", PATCH.name})


def find(kind, paths=None):
    hits = [d for p in (paths or training_manifests()) for d in load_yaml_docs(p)
            if d["kind"] == kind]
    assert len(hits) == 1, f"want exactly one {kind}, found {len(hits)}"
    return hits[0]


def job():
    return find("Job")


def pod():
    return job()["spec"]["template"]["spec"]


def container():
    (c,) = pod()["containers"]
    return c


def env():
    return {e["name"]: e["value"] for e in container().get("env", [])}


def mounts():
    return {m["name"]: m for m in container()["volumeMounts"]}


def volumes():
    return {v["name"]: v for v in pod()["volumes"]}


def configmap():
    return find("ConfigMap")


def trainer_config():
    return yaml.safe_load(configmap()["data"]["trainer.yaml"])


def defaults():
    return yaml.safe_load((SOURCE_DIR / "config/trainer.yaml").read_text())


def base_deployment():
    (d,) = [d for d in load_yaml_docs(K8S / "deployment.yaml") if d["kind"] == "Deployment"]
    return d


def arg_value(args, flag):
    """The value after `flag` in an argument list (flags take `--x v`, `--x=v` is not used)."""
    assert args.count(flag) == 1, (flag, args)
    return args[args.index(flag) + 1]


def mount_of(path):
    """(volume name, mount) whose mountPath is the longest prefix of an absolute path."""
    p = PurePosixPath(path)
    hits = [(name, m) for name, m in mounts().items()
            if p == PurePosixPath(m["mountPath"]) or PurePosixPath(m["mountPath"]) in p.parents]
    assert hits, f"{path} is on no volume of the trainer pod"
    return max(hits, key=lambda h: len(h[1]["mountPath"]))


@pytest.mark.parametrize("path", training_manifests(), ids=lambda p: p.name)
def test_schema(path, tmp_path):
    f = tmp_path / path.name
    f.write_text(yaml.safe_dump_all(load_yaml_docs(path)))
    r = validate(f)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "passed" in r.stdout + r.stderr


def test_schema_check_can_fail(tmp_path):
    bad = copy.deepcopy(job())
    bad["spec"]["template"]["spec"]["subdomian"] = "sparge-train"  # strict: unknown field
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(bad))
    assert validate(f).returncode != 0


def test_applying_the_serving_stack_starts_no_training():
    # `kubectl apply -k deploy/kubernetes` must never start a run on 8 GPUs.
    base = load_yaml_docs(K8S / "kustomization.yaml")[0]
    kinds = {d["kind"] for p in kustomized() for d in load_yaml_docs(p)}
    assert "Job" not in kinds
    assert not any(r.startswith("training") for r in base["resources"])


def test_training_kustomization_lists_every_manifest_with_the_same_image():
    k = load_yaml_docs(TRAINING / "kustomization.yaml")[0]
    base = load_yaml_docs(K8S / "kustomization.yaml")[0]
    assert sorted(k["resources"]) == [p.name for p in training_manifests()]
    assert k["namespace"] == base["namespace"]
    assert k["images"] == base["images"]  # one image for server and trainer
    assert container()["image"] == base_deployment()["spec"]["template"]["spec"][
        "containers"][0]["image"]


def test_job_runs_sparge_train_on_every_requested_gpu():
    c = container()
    assert c["command"] == ["/usr/bin/tini", "--", "sparge-train"]
    assert arg_value(c["args"], "--config") == "/etc/sparge/trainer.yaml"
    gpus = c["resources"]["limits"]["nvidia.com/gpu"]
    assert c["resources"]["requests"]["nvidia.com/gpu"] == gpus
    assert int(arg_value(c["args"], "--nproc-per-node")) == gpus
    assert trainer_config()["device"] == "cuda"  # each worker on its local rank's GPU


def test_config_and_prompts_come_from_the_configmap():
    name, m = mount_of("/etc/sparge/trainer.yaml")
    assert m["mountPath"] == "/etc/sparge" and m.get("readOnly")
    assert volumes()[name]["configMap"]["name"] == configmap()["metadata"]["name"]
    data = configmap()["data"]
    assert "trainer.yaml" in data
    prompts = trainer_config()["data"]["prompts"]
    assert mount_of(prompts)[0] == name, "the prompts file must be on the config volume"
    key = PurePosixPath(prompts).relative_to(m["mountPath"]).as_posix()
    lines = [ln for ln in data[key].splitlines() if ln.strip() and not ln.startswith("#")]
    assert len(lines) >= 8


def test_trainer_config_fields_exist_with_the_default_types():
    def walk(got, want, path):
        for key, value in got.items():
            where = f"{path}{key}"
            assert key in want, f"{where}: not a field of config/trainer.yaml"
            if isinstance(want[key], dict):
                assert isinstance(value, dict), where
                walk(value, want[key], where + ".")
            elif isinstance(want[key], float):
                assert isinstance(value, (int, float)) and not isinstance(value, bool), where
            else:
                assert type(value) is type(want[key]), where

    walk(trainer_config(), defaults(), "")


def test_model_and_output_paths_are_on_the_right_volumes():
    cfg = trainer_config()
    # The base model: read-only on the servers' models claim, where the download Job puts it.
    name, m = mount_of(cfg["model"])
    assert m.get("readOnly")
    assert volumes()[name]["persistentVolumeClaim"]["claimName"] == "sparge-models"
    (download,) = load_yaml_docs(K8S / "jobs/model-download.yaml")
    dl_env = {e["name"]: e["value"] for e in
              download["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert cfg["model"] == dl_env["DIR"]
    # Checkpoints: writable, on the claim this kustomization creates.
    name, m = mount_of(cfg["output_dir"])
    assert not m.get("readOnly")
    claim = volumes()[name]["persistentVolumeClaim"]["claimName"]
    pvc = find("PersistentVolumeClaim")
    assert claim == pvc["metadata"]["name"]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]  # the servers read it too
    # Resuming is what makes restarts safe.
    assert cfg.get("checkpoint", {}).get("resume", defaults()["checkpoint"]["resume"]) is True
    assert pod()["restartPolicy"] in {"OnFailure", "Never"}
    assert job()["spec"]["backoffLimit"] >= 1


def test_security_context_and_shared_memory():
    spec, c = pod(), container()
    server_spec = base_deployment()["spec"]["template"]["spec"]
    assert spec["securityContext"] == server_spec["securityContext"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    name, m = mount_of("/dev/shm")
    assert m["mountPath"] == "/dev/shm"
    assert volumes()[name]["emptyDir"]["medium"] == "Memory"
    assert set(mounts()) == set(volumes())
    assert env()["HOME"] == mount_of(env()["HOME"])[1]["mountPath"]


def test_indexed_job_nodes_and_rendezvous_host():
    spec = job()["spec"]
    assert spec["completionMode"] == "Indexed"  # JOB_COMPLETION_INDEX becomes NODE_RANK
    nnodes = int(env()["NNODES"])
    assert spec["completions"] == spec["parallelism"] == nnodes
    svc = find("Service")
    assert pod()["subdomain"] == svc["metadata"]["name"]
    assert svc["spec"]["clusterIP"] == "None"
    labels = job()["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    if nnodes > 1:
        assert env()["MASTER_ADDR"] == f"{job()['metadata']['name']}-0.{svc['metadata']['name']}"
    else:
        assert "MASTER_ADDR" not in env()  # one node: the launcher's loopback rendezvous


def merge_by_name(base, patch):
    """Strategic merge of a list of named items (containers, volumes, volumeMounts)."""
    out = copy.deepcopy(base)
    for item in patch:
        same = [o for o in out if o["name"] == item["name"]]
        if same:
            for k, v in item.items():
                if isinstance(v, list):
                    same[0][k] = merge_by_name(same[0].get(k, []), v)
                else:
                    same[0][k] = v
        else:
            out.append(copy.deepcopy(item))
    return out


def test_serve_checkpoints_patch_mounts_the_output_where_the_trainer_wrote_it(tmp_path):
    (patch,) = load_yaml_docs(PATCH)
    base = base_deployment()
    assert (patch["kind"], patch["metadata"]["name"]) == ("Deployment", base["metadata"]["name"])
    patched = copy.deepcopy(base)
    pspec = patch["spec"]["template"]["spec"]
    spec = patched["spec"]["template"]["spec"]
    spec["containers"] = merge_by_name(spec["containers"], pspec["containers"])
    spec["volumes"] = merge_by_name(spec["volumes"], pspec["volumes"])
    f = tmp_path / "patched.yaml"
    f.write_text(yaml.safe_dump(patched))
    r = validate(f)
    assert r.returncode == 0, r.stdout + r.stderr
    (server,) = [c for c in spec["containers"] if c["name"] == "sparge-server"]
    server_mounts = {m["name"]: m for m in server["volumeMounts"]}
    server_volumes = {v["name"]: v for v in spec["volumes"]}
    assert set(server_mounts) == set(server_volumes)
    # The trainer's output volume at the trainer's path: a checkpoint directory and its links
    # into /models resolve the same way in the server pod.
    out_name, out_mount = mount_of(trainer_config()["output_dir"])
    claim = volumes()[out_name]["persistentVolumeClaim"]["claimName"]
    hits = [n for n, v in server_volumes.items()
            if v.get("persistentVolumeClaim", {}).get("claimName") == claim]
    assert len(hits) == 1
    assert server_mounts[hits[0]]["mountPath"] == out_mount["mountPath"]
    assert server_mounts[hits[0]]["readOnly"] is True
    models = [n for n, v in server_volumes.items()
              if v.get("persistentVolumeClaim", {}).get("claimName") == "sparge-models"]
    assert server_mounts[models[0]]["mountPath"] == mounts()["models"]["mountPath"]


def test_job_flags_are_sparge_train_flags():
    binary = os.environ.get("SPARGE_TRAIN_BIN")
    if not binary or not Path(binary).exists():
        pytest.skip("SPARGE_TRAIN_BIN not built")
    r = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for a in container()["args"]:
        if a.startswith("--"):
            assert a in r.stdout, f"sparge-train --help does not list {a}"


def kustomize(path):
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    r = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def test_kustomize_builds_the_training_run():
    objs = kustomize(TRAINING)
    assert sorted(d["kind"] for d in objs) == ["ConfigMap", "Job", "PersistentVolumeClaim",
                                               "Service"]
    assert {d["metadata"]["namespace"] for d in objs} == {"sparge"}


def test_kustomize_with_the_serve_patch_mounts_checkpoints(tmp_path):
    # What README tells the operator to do: list the patch in the serving kustomization.
    root = tmp_path / "kubernetes"
    shutil.copytree(K8S, root)
    k = load_yaml_docs(root / "kustomization.yaml")[0]
    k["patches"] = [{"path": "training/serve-checkpoints-patch.yaml"}]
    (root / "kustomization.yaml").write_text(yaml.safe_dump(k))
    (dep,) = [d for d in kustomize(root) if d["kind"] == "Deployment"]
    spec = dep["spec"]["template"]["spec"]
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"]
              if "persistentVolumeClaim" in v}
    mount_paths = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
    assert {mount_paths[n] for n, c in claims.items()} == {"/models", "/checkpoints"}
    assert not any(d["kind"] == "Job" for d in kustomize(root))
