"""The metric-name extraction finds every name and nothing else (so the live check cannot pass by
extracting nothing)."""
from deploy_lib import metric_names, referenced_metrics


def test_extracts_names_not_functions_labels_or_keywords():
    expr = ('histogram_quantile(0.95, sum by (job, le) (rate(sparge_queue_wait_seconds_bucket'
            '{job="sparge-server", namespace=~"$namespace"}[$__rate_interval]))) > 300 and on '
            '(job, instance) increase(foo_total{a="b"}[10m]) == 0 or up{x="y"} / bool other:rec')
    assert metric_names(expr) == {"sparge_queue_wait_seconds_bucket", "foo_total", "up",
                                  "other:rec"}
    assert metric_names('avg_over_time(<<.Series>>{<<.LabelMatchers>>}[1m])') == set()


def test_every_source_names_metrics():
    refs = referenced_metrics()
    wheres = {w.split(":")[0] for ws in refs.values() for w in ws}
    assert {"sparge-serve.json", "alerts.yml", "hpa.yaml",
            "adapter-values.yaml"} <= wheres, wheres
    assert len([n for n in refs if n.startswith("sparge_")]) >= 15, sorted(refs)
