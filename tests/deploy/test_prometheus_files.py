"""deploy/prometheus: alert rules pass `promtool check rules` and their unit tests
(`promtool test rules`), and the scrape config passes `promtool check config`."""
import shutil
import subprocess

import pytest
import yaml

from deploy_lib import PROM, load_yaml_docs

PROMTOOL = shutil.which("promtool")


def promtool(*args, cwd=PROM):
    assert PROMTOOL, "promtool not found: scripts/setup.sh installs Debian's prometheus package"
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True)


def test_check_rules():
    r = promtool("check", "rules", "alerts.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 6 rules found" in r.stdout


def test_rule_unit_tests():
    r = promtool("test", "rules", "alerts_test.yml")
    assert r.returncode == 0, r.stdout + r.stderr


def test_rule_unit_tests_can_fail(tmp_path):
    # A threshold change the unit tests must notice.
    shutil.copy(PROM / "alerts_test.yml", tmp_path)
    (tmp_path / "alerts.yml").write_text(
        (PROM / "alerts.yml").read_text().replace("> 0.05", "> 0.5"))
    assert promtool("test", "rules", "alerts_test.yml", cwd=tmp_path).returncode != 0


def test_every_alert_has_a_unit_test():
    rules = {r["alert"] for g in load_yaml_docs(PROM / "alerts.yml")[0]["groups"]
             for r in g["rules"]}
    tested = {t["alertname"] for case in load_yaml_docs(PROM / "alerts_test.yml")[0]["tests"]
              for t in case.get("alert_rule_test", []) if t["exp_alerts"]}
    assert rules == tested


def test_check_config(tmp_path):
    # Debian's prometheus is built without Kubernetes service discovery (its client libraries are
    # not packaged), so promtool there rejects kubernetes_sd_configs. Everything else of the file
    # is checked with the discovery block swapped for a static target.
    cfg = load_yaml_docs(PROM / "prometheus.yml")[0]
    for job in cfg["scrape_configs"]:
        assert "kubernetes_sd_configs" in job
        sd = job.pop("kubernetes_sd_configs")
        assert sd[0]["role"] == "pod"
        job["static_configs"] = [{"targets": ["127.0.0.1:9090"]}]
    shutil.copy(PROM / "alerts.yml", tmp_path)
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    r = promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
