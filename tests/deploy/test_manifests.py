"""deploy/kubernetes: every manifest validates against the Kubernetes 1.37 schemas (strict, offline,
kubernetes-validate), and the manifests agree with each other and with the server config."""
import copy
import subprocess
import sys

import pytest
import yaml

from deploy_lib import K8S, PROM, adapter_rules, load_yaml_docs

# Custom resources of the Prometheus Operator: kubernetes-validate ships only the built-in
# Kubernetes schemas and the operator's CRD schemas are not available offline, so these are
# skipped by the schema check and checked structurally below instead.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"),
             ("monitoring.coreos.com/v1", "PrometheusRule")}


def kustomized():
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def manifests():
    # jobs/: one-off Jobs applied by hand, outside the kustomization.
    return kustomized() + sorted((K8S / "jobs").glob("*.yaml"))


def objects():
    return [(p.name, d) for p in manifests() for d in load_yaml_docs(p)]


def find(kind, name=None):
    hits = [d for _, d in objects() if d["kind"] == kind
            and (name is None or d["metadata"]["name"] == name)]
    assert len(hits) == 1, f"want exactly one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


def validate(path):
    return subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "-k", "1.37.0",
                           str(path)], capture_output=True, text=True)


@pytest.mark.parametrize("path", manifests(), ids=lambda p: p.relative_to(K8S).as_posix())
def test_schema(path, tmp_path):
    docs = load_yaml_docs(path)
    builtin = [d for d in docs if (d["apiVersion"], d["kind"]) not in CRD_KINDS]
    if not builtin:
        pytest.skip(f"{path.name}: custom resource, no offline schema (checked structurally)")
    f = tmp_path / path.name
    f.write_text(yaml.safe_dump_all(builtin))
    r = validate(f)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "passed" in r.stdout + r.stderr


def test_schema_check_can_fail(tmp_path):
    bad = copy.deepcopy(find("Deployment"))
    bad["spec"]["template"]["spec"]["containers"][0]["startupProbe"]["grpc"]["portt"] = 1
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(bad))
    assert validate(f).returncode != 0


def test_kustomization_lists_every_manifest():
    k = load_yaml_docs(K8S / "kustomization.yaml")[0]
    assert sorted(k["resources"]) == sorted(p.name for p in kustomized())
    assert k["namespace"] == "sparge"
    container = find("Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] in {i["name"] for i in k["images"]}


def server_config():
    return yaml.safe_load(find("ConfigMap", "sparge-server-config")["data"]["server.yaml"])


def pod_spec():
    return find("Deployment", "sparge-server")["spec"]["template"]["spec"]


def test_termination_grace_covers_prestop_and_shutdown_grace():
    spec = pod_spec()
    grace = server_config()["shutdown_grace_seconds"]
    pre_stop = spec["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
    total = spec["terminationGracePeriodSeconds"]
    # A margin of 10-60 s past preStop + drain: enough to cancel at a step boundary and exit,
    # not so much that a hung pod holds its GPU for long.
    assert pre_stop + grace + 10 <= total <= pre_stop + grace + 60, (pre_stop, grace, total)


def test_ports_probes_and_args_agree_with_config():
    spec = pod_spec()
    c = spec["containers"][0]
    cfg = server_config()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": cfg["port"], "metrics": cfg["metrics_port"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == cfg["port"], probe
    assert c["args"][:2] == ["--config", "/etc/sparge/server.yaml"]
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert set(mounts) == set(volumes)
    assert mounts["config"]["mountPath"] == "/etc/sparge"
    assert volumes["config"]["configMap"]["name"] == "sparge-server-config"
    assert mounts["models"]["mountPath"] == "/models" and mounts["models"]["readOnly"]
    claim = volumes["models"]["persistentVolumeClaim"]["claimName"]
    assert find("PersistentVolumeClaim", claim)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert cfg["device"].startswith("cuda")


def test_security_context():
    spec = pod_spec()
    c = spec["containers"][0]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_selectors_match_pods():
    labels = find("Deployment")["spec"]["template"]["metadata"]["labels"]
    dep = find("Deployment")
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert find("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    container_ports = {p["name"] for p in pod_spec()["containers"][0]["ports"]}
    services = [d for _, d in objects() if d["kind"] == "Service"]
    assert services
    for s in services:
        assert s["spec"]["selector"].items() <= labels.items(), s["metadata"]["name"]
        for p in s["spec"]["ports"]:
            assert p["targetPort"] in container_ports


def test_service_monitor_scrapes_the_metrics_port():
    sm = find("ServiceMonitor")
    services = [d for _, d in objects() if d["kind"] == "Service"
                and sm["spec"]["selector"]["matchLabels"].items() <= d["metadata"]["labels"].items()
                and "sparge.dev/service-role" not in d["metadata"]["labels"]]
    assert [s["metadata"]["name"] for s in services] == ["sparge-server"]  # job label in alerts
    port_names = {p["name"] for p in services[0]["spec"]["ports"]}
    for ep in sm["spec"]["endpoints"]:
        assert ep["port"] in port_names and ep["path"] == "/metrics"


def test_hpa_scales_the_deployment_on_the_adapter_metric():
    hpa = find("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": "sparge-server"}
    served = {r["name"]["as"] for r in adapter_rules()}
    pods_metrics = [m for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert pods_metrics
    for m in pods_metrics:
        assert m["pods"]["metric"]["name"] in served
    for r in adapter_rules():
        assert r["resources"]["overrides"]["pod"]["resource"] == "pod"
        assert r["resources"]["overrides"]["namespace"]["resource"] == "namespace"


def test_prometheus_rule_is_a_copy_of_alerts_yml():
    rule = find("PrometheusRule")
    assert rule["spec"]["groups"] == load_yaml_docs(PROM / "alerts.yml")[0]["groups"]


def test_hpa_owns_the_replica_count():
    # A replicas field would be re-applied by every `kubectl apply`, undoing the HPA's scaling.
    assert "replicas" not in find("Deployment")["spec"]


def test_model_download_job_fills_the_model_claim():
    (job,) = load_yaml_docs(K8S / "jobs/model-download.yaml")
    k = load_yaml_docs(K8S / "kustomization.yaml")[0]
    assert job["metadata"]["namespace"] == k["namespace"]
    spec = job["spec"]["template"]["spec"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"]
              if "persistentVolumeClaim" in v}
    assert claims == {"sparge-models"} and find("PersistentVolumeClaim", "sparge-models")
    env = {e["name"]: e["value"] for e in spec["containers"][0]["env"]}
    assert env["DIR"].startswith("/models/")
