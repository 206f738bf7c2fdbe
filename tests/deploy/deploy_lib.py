"""Shared helpers of the deploy tests: locating deploy files and pulling metric names out of the
PromQL in dashboards, alert rules, the HPA and the prometheus-adapter rules."""
import json
import os
import re
from pathlib import Path

import yaml

SOURCE_DIR = Path(os.environ.get("SPARGE_SOURCE_DIR", Path(__file__).resolve().parents[2]))
DEPLOY = SOURCE_DIR / "deploy"
K8S = DEPLOY / "kubernetes"
PROM = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"

_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
    "unless", "offset", "inf", "nan", "le",
}


def load_yaml_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def metric_names(expr):
    """Metric names a PromQL expression selects (Grafana and adapter placeholders removed)."""
    s = re.sub(r"<<\.[A-Za-z]+>>", "", expr)
    s = re.sub(r'"(?:\\.|[^"\\])*"', '""', s)          # string literals (label values)
    s = re.sub(r"\{[^}]*\}", "", s)                     # label matchers
    s = re.sub(r"\[[^\]]*\]", "", s)                    # range and subquery durations
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\$[A-Za-z_]\w*", "", s)               # Grafana variables
    names = set()
    for m in re.finditer(r"(?<![\w.$])([A-Za-z_:][\w:]*)(\s*\()?", s):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in _KEYWORDS or re.fullmatch(r"\d.*", word):
            continue
        names.add(word)
    return names


def dashboard_files():
    return sorted((GRAFANA / "dashboards").glob("*.json"))


def dashboard_queries():
    """(dashboard file, panel title, PromQL) of every panel target and query variable."""
    out = []
    for path in dashboard_files():
        dash = json.loads(path.read_text())
        panels = list(dash.get("panels", []))
        while panels:
            p = panels.pop()
            panels.extend(p.get("panels", []))  # collapsed rows
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((path.name, p.get("title", ""), t["expr"]))
        for v in dash.get("templating", {}).get("list", []):
            if v.get("type") == "query":
                q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
                m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", q.strip())
                out.append((path.name, "variable " + v["name"], m.group(1) if m else q))
    return out


def alert_rules():
    return [r for g in load_yaml_docs(PROM / "alerts.yml")[0]["groups"] for r in g["rules"]]


def adapter_rules():
    return load_yaml_docs(PROM / "adapter-values.yaml")[0]["rules"]["custom"]


def hpa_pod_metrics():
    names = []
    for d in load_yaml_docs(K8S / "hpa.yaml"):
        for m in d["spec"]["metrics"]:
            if m["type"] == "Pods":
                names.append(m["pods"]["metric"]["name"])
    return names


def referenced_metrics():
    """{metric name: [where it is used]} over dashboards, alert rules, HPA and adapter rules."""
    refs = {}

    def add(names, where):
        for n in names:
            refs.setdefault(n, []).append(where)

    for f, title, expr in dashboard_queries():
        add(metric_names(expr), f"{f}: {title}")
    for r in alert_rules():
        add(metric_names(r["expr"]), f"alerts.yml: {r['alert']}")
    for r in adapter_rules():
        add(metric_names(r["seriesQuery"]), "adapter-values.yaml: seriesQuery")
        add(metric_names(r["metricsQuery"].replace("<<.Series>>", "")), "adapter metricsQuery")
    add(hpa_pod_metrics(), "hpa.yaml")
    return refs


def exposed_names(text):
    """Sample names in a Prometheus text exposition."""
    return {re.match(r"[A-Za-z_:][\w:]*", line).group(0)
            for line in text.splitlines() if line and not line.startswith("#")}


def find_k8s_container():
    """(pod spec, first container) of the sparge-server Deployment."""
    for d in load_yaml_docs(K8S / "deployment.yaml"):
        if d["kind"] == "Deployment":
            spec = d["spec"]["template"]["spec"]
            return spec, spec["containers"][0]
    raise AssertionError("no Deployment in deployment.yaml")
