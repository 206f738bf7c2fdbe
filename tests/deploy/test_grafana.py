"""deploy/grafana: the dashboard JSON is loadable as provisioned (unique ids, panels inside the
24-column grid and not overlapping, every query on the dashboard's data source variable) and the
provisioning files point at it."""
import json

from deploy_lib import GRAFANA, dashboard_files, load_yaml_docs

KNOWN_PANEL_TYPES = {"timeseries", "heatmap", "stat", "gauge", "table", "bargauge", "row", "text"}


def test_dashboards_are_well_formed():
    assert dashboard_files()
    uids = set()
    for path in dashboard_files():
        dash = json.loads(path.read_text())
        assert dash["uid"] not in uids
        uids.add(dash["uid"])
        variables = {v["name"]: v for v in dash["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        ids = [p["id"] for p in dash["panels"]]
        assert len(ids) == len(set(ids)), ids
        cells = set()
        for p in dash["panels"]:
            assert p["type"] in KNOWN_PANEL_TYPES, p["type"]
            g = p["gridPos"]
            assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, (p["title"], g)
            mine = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                    for y in range(g["y"], g["y"] + g["h"])}
            assert not mine & cells, f"panel '{p['title']}' overlaps another"
            cells |= mine
            if p["type"] == "row":
                continue
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
            assert p["targets"], p["title"]
            for t in p["targets"]:
                assert t["datasource"]["uid"] == "${datasource}" and t["expr"], p["title"]
            if p["type"] == "heatmap":
                assert all(t.get("format") == "heatmap" and "le" in t["expr"]
                           for t in p["targets"]), p["title"]


def test_provisioning_points_at_the_dashboards():
    provider = load_yaml_docs(GRAFANA / "provisioning/dashboards/sparge.yaml")[0]["providers"][0]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards/sparge"
    ds = load_yaml_docs(GRAFANA / "provisioning/datasources/prometheus.yaml")[0]["datasources"]
    assert [d["type"] for d in ds] == ["prometheus"]
