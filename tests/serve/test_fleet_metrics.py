"""Replica-labelled metrics, their merge and the Prometheus discovery answer (ember/serve/fleet_metrics.py):
checked with prometheus_client's own parser, on the server's real registry."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from ember.engine.engine import EngineStats
from ember.serve.fleet_metrics import ReplicaMetricsServer, http_sd_targets, merge_expositions
from ember.serve.metrics import ServerMetrics


def server_metrics(running: int, prompt_tokens: int) -> ServerMetrics:
    stats = EngineStats(num_running=running, num_waiting=0, kv_cache_usage=0.25, num_kv_blocks=64,
                        prefix_cache_queries=100, prefix_cache_hits=40, num_preemptions=0,
                        prompt_tokens_total=prompt_tokens, generation_tokens_total=7, num_requests_finished=1)
    m = ServerMetrics(lambda: stats, "tiny")
    m.success.labels("tiny", "stop").inc()
    m.ttft.observe(0.05)
    return m


def samples(text: str) -> dict[str, list]:
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_each_replica_serves_its_metrics_labelled():
    a = ReplicaMetricsServer(server_metrics(3, 50).registry, "EmberReplica#a", host="127.0.0.1")
    b = ReplicaMetricsServer(server_metrics(1, 20).registry, "EmberReplica#b", host="127.0.0.1",
                             port=a.port)  # a fixed port already taken: the next free one
    try:
        assert b.port != a.port and a.url == f"http://127.0.0.1:{a.port}/metrics"
        text = httpx.get(a.url, timeout=10).text
        got = samples(text)
        assert got["ember:num_requests_running"][0].labels == {"model_name": "tiny", "replica": "EmberReplica#a"}
        assert got["ember:num_requests_running"][0].value == 3
        assert all(s.labels.get("replica") == "EmberReplica#a" for ss in got.values() for s in ss)

        merged = merge_expositions([text, httpx.get(b.url, timeout=10).text]).decode()
        type_lines = [line for line in merged.splitlines() if line.startswith("# TYPE ")]
        assert len(type_lines) == len(set(type_lines))  # one TYPE per family, as Prometheus requires
        both = samples(merged)
        running = {s.labels["replica"]: s.value for s in both["ember:num_requests_running"]}
        assert running == {"EmberReplica#a": 3, "EmberReplica#b": 1}
        prompt = {s.labels["replica"]: s.value for s in both["ember:prompt_tokens"]}
        assert prompt == {"EmberReplica#a": 50, "EmberReplica#b": 20}
        ttft_counts = [s for s in both["ember:time_to_first_token_seconds"] if s.name.endswith("_count")]
        assert sorted(s.labels["replica"] for s in ttft_counts) == ["EmberReplica#a", "EmberReplica#b"]
    finally:
        a.close()
        b.close()


def test_http_sd_answer():
    out = http_sd_targets({"EmberReplica#b": "http://10.0.0.2:9101/metrics",
                           "EmberReplica#a": "http://10.0.0.1:9100/metrics"}, {"job_hint": "ember"})
    assert out == [{"targets": ["10.0.0.1:9100"], "labels": {"job_hint": "ember", "__metrics_path__": "/metrics"}},
                   {"targets": ["10.0.0.2:9101"], "labels": {"job_hint": "ember", "__metrics_path__": "/metrics"}}]
