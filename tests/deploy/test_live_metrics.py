"""Every metric a dashboard, alert rule, HPA or prometheus-adapter rule names really exists.

Starts the real sparge-server (embedded tiny model, CPU) with the Kubernetes ConfigMap's server
config, runs a few requests with sparge-cli, then
  1. scrapes /metrics and fails on any referenced metric the server does not expose, and
  2. runs a real Prometheus on loopback (temp dir, 1 s scrapes, the deploy scrape job and alert
     rules) and evaluates every dashboard query and the adapter's metrics query through its HTTP
     API, expecting data.
Environment: SPARGE_SERVER_BIN, SPARGE_CLI_BIN (set by tests/deploy/CMakeLists.txt)."""
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from deploy_lib import (K8S, PROM, adapter_rules, dashboard_queries, exposed_names,
                        load_yaml_docs, metric_names, referenced_metrics)

SERVER = os.environ.get("SPARGE_SERVER_BIN")
CLI = os.environ.get("SPARGE_CLI_BIN")
POD = "sparge-server-test-0"
NAMESPACE = "sparge"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def stop(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    assert SERVER and CLI, "SPARGE_SERVER_BIN and SPARGE_CLI_BIN must be set (ctest sets them)"
    prometheus_bin = shutil.which("prometheus")
    assert prometheus_bin, "prometheus not found: scripts/setup.sh installs Debian's package"
    work = tmp_path_factory.mktemp("live")
    grpc_port, metrics_port, prom_port = free_port(), free_port(), free_port()

    # The ConfigMap's config exactly, with CPU and test ports by flags.
    configmap = [d for d in load_yaml_docs(K8S / "configmap.yaml") if d["kind"] == "ConfigMap"][0]
    (work / "server.yaml").write_text(configmap["data"]["server.yaml"])
    server_log = open(work / "server.log", "w")
    server = subprocess.Popen(
        # `timeout` bounds the server even if this process dies without its cleanup.
        ["timeout", "600", SERVER, "--config", str(work / "server.yaml"), "--device", "cpu", "--port", str(grpc_port),
         "--metrics-port", str(metrics_port), "--listen-address", "127.0.0.1"],
        stdout=server_log, stderr=subprocess.STDOUT)
    procs = [server]
    try:
        target = f"127.0.0.1:{grpc_port}"
        deadline = time.time() + 240
        while subprocess.run([CLI, "health", "--server", target], capture_output=True).returncode:
            assert server.poll() is None, (work / "server.log").read_text()
            assert time.time() < deadline, "server not SERVING in 240 s\n" + (
                work / "server.log").read_text()
            time.sleep(0.25)

        # Prometheus: the deploy scrape job with its pod discovery replaced by a static target
        # carrying the meta labels a discovered pod has, so the job's relabelling runs as in a
        # cluster (Debian's prometheus has no Kubernetes discovery).
        cfg = load_yaml_docs(PROM / "prometheus.yml")[0]
        job = cfg["scrape_configs"][0]
        job.pop("kubernetes_sd_configs")
        job["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"], "labels": {
            "__meta_kubernetes_pod_label_app_kubernetes_io_name": "sparge-server",
            "__meta_kubernetes_pod_container_port_name": "metrics",
            "__meta_kubernetes_namespace": NAMESPACE,
            "__meta_kubernetes_pod_name": POD}}]
        cfg["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        cfg["rule_files"] = [str(PROM / "alerts.yml")]
        (work / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        prom_log = open(work / "prometheus.log", "w")
        prom = subprocess.Popen(
            ["timeout", "600", prometheus_bin, f"--config.file={work / 'prometheus.yml'}",
             f"--storage.tsdb.path={work / 'data'}", f"--web.listen-address=127.0.0.1:{prom_port}",
             "--storage.tsdb.retention.time=1h"],
            stdout=prom_log, stderr=subprocess.STDOUT)
        procs.append(prom)
        api = f"http://127.0.0.1:{prom_port}/api/v1"

        # Requests: a sparse MP4, a dense PNG tar and an invalid one (INVALID_ARGUMENT).
        for args in (["--mode", "hybrid", "--topk", "0.2", "--topp", "0.5", "--dense-steps", "1"],
                     ["--mode", "dense", "--format", "png"]):
            r = subprocess.run([CLI, "generate", "--server", target, "--prompt", "a red fox",
                                "--width", "64", "--height", "64", "--frames", "5", "--steps", "3",
                                "--quiet", "--out", str(work / "out.bin"), *args],
                               capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, r.stdout + r.stderr
        # A longer job, watched from /metrics while it runs: the job-state gauge must rise above
        # 0 while the job holds state and fall back to 0 once it has finished.
        gen = subprocess.Popen([CLI, "generate", "--server", target, "--prompt", "waves",
                                "--width", "128", "--height", "128", "--frames", "9", "--steps",
                                "8", "--quiet", "--out", str(work / "long.mp4")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        state_bytes_seen = set()
        while gen.poll() is None:
            for line in http_get(metrics_url).splitlines():
                if line.startswith("sparge_job_state_bytes "):
                    state_bytes_seen.add(float(line.split()[1]))
            time.sleep(0.02)
        assert gen.returncode == 0, gen.stderr.read()
        assert max(state_bytes_seen, default=0) > 0, state_bytes_seen
        assert "sparge_job_state_bytes 0" in http_get(metrics_url)
        # The engine timed self-attention in the steps above (the share panel divides by it).
        attention = [float(line.split()[1]) for line in http_get(metrics_url).splitlines()
                     if line.startswith("sparge_attention_seconds_total ")]
        assert attention and attention[0] > 0, attention
        bad = subprocess.run([CLI, "generate", "--server", target, "--prompt", "x", "--width", "17",
                              "--out", str(work / "bad.mp4")], capture_output=True, text=True)
        assert bad.returncode != 0

        # Wait until Prometheus has samples from after the requests.
        query = urllib.parse.quote('sparge_request_duration_seconds_count{job="sparge-server"} >= 2')
        deadline = time.time() + 60
        while True:
            assert prom.poll() is None, (work / "prometheus.log").read_text()
            try:
                if json.loads(http_get(f"{api}/query?query={query}"))["data"]["result"]:
                    break
            except OSError:
                pass
            assert time.time() < deadline, (work / "prometheus.log").read_text()
            time.sleep(0.5)
        time.sleep(3)  # a few more scrapes, so every rate() window holds two or more samples
        yield {"metrics_url": f"http://127.0.0.1:{metrics_port}/metrics", "api": api, "work": work}
    finally:
        for p in reversed(procs):
            stop(p)
        server_log.close()


def test_every_referenced_metric_is_exposed(stack):
    exposed = exposed_names(http_get(stack["metrics_url"]))
    assert "sparge_requests_total" in exposed
    refs = referenced_metrics()
    # `up` is made by Prometheus for every target, not exposed by the server (checked below).
    missing = {n: w for n, w in refs.items() if n not in exposed and n != "up"}
    assert not missing, "metrics named in deploy/ but not exposed by sparge-server:\n" + "\n".join(
        f"  {n}: {', '.join(w)}" for n, w in sorted(missing.items()))


def prom_query(stack, expr):
    body = json.loads(http_get(f"{stack['api']}/query?" + urllib.parse.urlencode({"query": expr})))
    assert body["status"] == "success", body
    return body["data"]["result"]


def grafana_to_promql(expr):
    # The dashboard's variables as Grafana would expand them for "All" and a 1 s scrape.
    return (expr.replace("$__rate_interval", "1m").replace("$namespace", ".*")
            .replace("$__interval", "1m"))


@pytest.mark.parametrize("dashboard,title,expr", dashboard_queries(),
                         ids=[f"{d}:{t}" for d, t, _ in dashboard_queries()])
def test_dashboard_query_returns_data(stack, dashboard, title, expr):
    result = prom_query(stack, grafana_to_promql(expr))
    assert result, f"{dashboard} '{title}': no data for {expr}"


def test_dashboard_namespace_variable_has_values(stack):
    q = urllib.parse.urlencode({"match[]": 'sparge_model_ready{job="sparge-server"}'})
    body = json.loads(http_get(f"{stack['api']}/label/namespace/values?{q}"))
    assert body["data"] == [NAMESPACE]


def test_adapter_metrics_query_returns_data_per_pod(stack):
    for rule in adapter_rules():
        series = prom_query(stack, rule["seriesQuery"])
        assert series and all(s["metric"]["pod"] == POD for s in series), series
        name = series[0]["metric"]["__name__"]
        q = (rule["metricsQuery"].replace("<<.Series>>", name)
             .replace("<<.LabelMatchers>>", f'namespace="{NAMESPACE}",pod=~"{POD}"')
             .replace("<<.GroupBy>>", "pod"))
        result = prom_query(stack, q)
        assert [r["metric"].get("pod") for r in result] == [POD], (q, result)


def test_alert_rules_load_and_evaluate(stack):
    body = json.loads(http_get(f"{stack['api']}/rules"))
    rules = [r for g in body["data"]["groups"] for r in g["rules"]]
    assert len(rules) == 6
    for r in rules:
        assert r["health"] == "ok", r
        # A healthy server with idle queues fires nothing.
        assert r["state"] == "inactive", r
    # Every series an alert reads is in Prometheus (the alerts themselves are inactive).
    names = {n for r in rules for n in metric_names(r["query"])}
    for n in names:
        assert prom_query(stack, f'count({n}{{job="sparge-server"}})'), n
