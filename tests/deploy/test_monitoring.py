"""deploy/grafana and deploy/prometheus: every metric the dashboard queries is one ember exports (read
from a live ServerMetrics registry and the Ray front's counters, not from a list kept by hand), the
dashboard covers what an operator needs, and the scrape config points at the routes that exist."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from ember.engine.engine import EngineStats
from ember.serve.metrics import ServerMetrics

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = json.loads((REPO / "deploy" / "grafana" / "ember-dashboard.json").read_text())
PROMETHEUS = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
FRONT_METRICS = {"ember:fleet_replicas", "ember:fleet_request_retries_total", "ember:fleet_broken_streams_total"}


def exported_names() -> set[str]:
    """Sample names a server's /metrics really carries (histogram _bucket/_sum/_count, counter _total)."""
    from prometheus_client.parser import text_string_to_metric_families

    stats = EngineStats(1, 0, 0.5, 8, 10, 5, 0, 10, 10, 1)
    m = ServerMetrics(lambda: stats, "m")
    m.success.labels("m", "stop").inc()
    m.failure.labels("m", "queue_full").inc()
    for h in (m.ttft, m.itl, m.e2e, m.queue_time):
        h.observe(0.1)
    names = {s.name for f in text_string_to_metric_families(m.render().decode()) for s in f.samples}
    return names | FRONT_METRICS


def exprs() -> list[str]:
    return [t["expr"] for p in DASHBOARD["panels"] for t in p["targets"]]


def test_dashboard_queries_only_metrics_ember_exports():
    names = exported_names()
    used = {n for e in exprs() for n in re.findall(r"ember:[a-z0-9_]+", e)}
    assert used and used <= names, used - names
    for e in exprs():
        assert e.count("(") == e.count(")") and e.count("{") == e.count("}"), e


def test_front_metrics_names_match_the_code():
    code = (REPO / "ember" / "serve" / "ray.py").read_text()
    for name in FRONT_METRICS:
        assert f'"{name.removesuffix("_total")}"' in code, name


def test_dashboard_covers_the_operators_questions():
    text = "\n".join(exprs())
    for metric in ("ember:time_to_first_token_seconds_bucket", "ember:inter_token_latency_seconds_bucket"):
        for q in ("0.5", "0.95", "0.99"):
            assert f"histogram_quantile({q}, sum by (le) (rate({metric}" in text, (metric, q)
    for needed in ("rate(ember:generation_tokens_total", "ember:num_requests_running", "ember:num_requests_waiting",
                   "ember:kv_cache_usage_perc", "rate(ember:prefix_cache_hits_total",
                   "rate(ember:request_failure_total", "sum by (replica)"):
        assert needed in text, needed
    variables = {v["name"] for v in DASHBOARD["templating"]["list"]}
    assert variables == {"datasource", "model_name", "replica"}
    assert all(p["datasource"]["uid"] == "${datasource}" for p in DASHBOARD["panels"])
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))


def test_prometheus_config_scrapes_the_routes_that_exist():
    jobs = {j["job_name"]: j for j in PROMETHEUS["scrape_configs"]}
    assert jobs["ember-ray-replicas"]["http_sd_configs"][0]["url"].endswith("/fleet/targets")
    assert jobs["ember"]["metrics_path"] == "/metrics"
    kserve = jobs["ember-kserve"]
    assert kserve["kubernetes_sd_configs"] == [{"role": "pod"}]
    isvc = yaml.safe_load((REPO / "deploy" / "kserve" / "inferenceservice.yaml").read_text())
    ann = isvc["metadata"]["annotations"]
    # the relabelling reads the annotations the manifest sets (Prometheus' __meta_ names: non-alphanumerics -> _)
    for key in ("prometheus.kserve.io/port", "prometheus.kserve.io/path"):
        assert key in ann
        meta = "__meta_kubernetes_pod_annotation_" + re.sub(r"[^a-zA-Z0-9]", "_", key)
        assert any(meta in r.get("source_labels", []) for r in kserve["relabel_configs"]), meta
    # an http_sd answer is what the front serves (fleet_metrics.http_sd_targets), in the shape Prometheus reads
    from ember.serve.fleet_metrics import http_sd_targets

    [group] = http_sd_targets({"r": "http://10.0.0.1:9100/metrics"})
    assert set(group) == {"targets", "labels"} and all(isinstance(t, str) for t in group["targets"])
