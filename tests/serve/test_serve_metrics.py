"""GET /metrics: vLLM-like names under `ember:`, counters and histograms that follow the requests,
one registry per app, and the periodic log line."""

from __future__ import annotations

import logging
import time

import httpx

from ember.serve import running
from ember.serve.metrics import LATENCY_BUCKETS
from tests.serve.conftest import make_app, metric, wait_idle

NAMES = ["ember:num_requests_running", "ember:num_requests_waiting", "ember:kv_cache_usage_perc",
         "ember:prefix_cache_queries_total", "ember:prefix_cache_hits_total", "ember:num_preemptions_total",
         "ember:prompt_tokens_total", "ember:generation_tokens_total", "ember:request_success_total",
         "ember:time_to_first_token_seconds_bucket", "ember:inter_token_latency_seconds_bucket",
         "ember:e2e_request_latency_seconds_bucket", "ember:request_queue_time_seconds_bucket"]


def test_metrics_follow_the_requests(server, client) -> None:
    wait_idle(server)
    before = {n: server.metric(n) for n in ("ember:prompt_tokens_total", "ember:generation_tokens_total",
                                            "ember:time_to_first_token_seconds_count",
                                            "ember:inter_token_latency_seconds_count",
                                            "ember:e2e_request_latency_seconds_count")}
    ok = server.metric("ember:request_success_total", finished_reason="length")
    missing = server.metric("ember:request_failure_total", reason="model_not_found")
    usage = [client.completions.create(model="tiny", prompt=f"Metrics {i}", max_tokens=5, temperature=0).usage
             for i in range(3)]
    httpx.post(server.url + "/v1/completions", json={"prompt": "x", "model": "other"})
    text = httpx.get(server.url + "/metrics").text
    for name in NAMES:
        assert name + "{" in text, name
    assert server.metric("ember:prompt_tokens_total") - before["ember:prompt_tokens_total"] == \
        sum(u.prompt_tokens for u in usage)
    assert server.metric("ember:generation_tokens_total") - before["ember:generation_tokens_total"] == 15
    assert server.metric("ember:request_success_total", finished_reason="length") == ok + 3
    assert server.metric("ember:request_failure_total", reason="model_not_found") == missing + 1
    assert server.metric("ember:time_to_first_token_seconds_count") == before[
        "ember:time_to_first_token_seconds_count"] + 3
    assert server.metric("ember:e2e_request_latency_seconds_count") == before[
        "ember:e2e_request_latency_seconds_count"] + 3
    assert server.metric("ember:inter_token_latency_seconds_count") == before[
        "ember:inter_token_latency_seconds_count"] + 12  # 4 gaps between 5 tokens, per request
    assert server.metric("ember:kv_cache_usage_perc") == 0 and server.metric("ember:num_requests_running") == 0


def test_prefix_cache_hits_show(server, client) -> None:
    shared = "The same long preamble about Python lists and tuples. " * 6
    hits = server.metric("ember:prefix_cache_hits_total")
    for tail in ("A", "B"):
        client.completions.create(model="tiny", prompt=shared + tail, max_tokens=1)
    assert server.metric("ember:prefix_cache_hits_total") > hits


def test_latency_buckets_are_fine_enough_for_p95() -> None:
    ratios = [b / a for a, b in zip(LATENCY_BUCKETS, LATENCY_BUCKETS[1:])]
    assert max(ratios) < 1.27 and LATENCY_BUCKETS[0] <= 0.001 and LATENCY_BUCKETS[-1] >= 100


def test_each_app_has_its_own_registry_and_logs_throughput(tiny_dir, server, caplog) -> None:
    seen = server.metric("ember:request_success_total")
    with caplog.at_level(logging.INFO, logger="ember.serve"), running(make_app(tiny_dir, log_interval=0.2)) as url:
        assert metric(url, "ember:request_success_total") == 0  # a fresh app starts from zero
        r = httpx.post(url + "/v1/completions", json={"prompt": "log me", "max_tokens": 200, "ignore_eos": True})
        assert r.status_code == 200 and metric(url, "ember:request_success_total") == 1
        deadline = time.monotonic() + 10
        while "generation" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
    assert server.metric("ember:request_success_total") == seen
    line = next(r.getMessage() for r in caplog.records if "generation" in r.getMessage())
    for word in ("prompt", "tok/s", "running", "waiting", "KV cache", "prefix cache hit rate"):
        assert word in line, line
