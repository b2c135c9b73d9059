"""`ember bench serve`: the workload generators, the statistics, and whole runs against a server
(and the offline engine) on the tiny model."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from ember.commands.bench import BenchServeConfig, bench_serve
from ember.serve.loadgen import (LoadgenError, RequestResult, arrival_times, file_requests, random_requests,
                                 summarize)


def test_poisson_arrivals() -> None:
    times = arrival_times(4000, rate=5.0, seed=1)
    gaps = np.diff([0.0] + times)
    assert times == sorted(times) and times == arrival_times(4000, 5.0, seed=1)
    assert gaps.mean() == pytest.approx(1 / 5.0, rel=0.06)
    assert gaps.std() == pytest.approx(1 / 5.0, rel=0.1)  # exponential: std = mean
    assert arrival_times(3, float("inf")) == [0.0, 0.0, 0.0]
    with pytest.raises(LoadgenError, match="request-rate"):
        arrival_times(3, 0.0)


def test_random_requests_lengths_prefix_and_vocabulary() -> None:
    reqs = random_requests(200, input_len=40, output_len=10, vocab_size=50, seed=0, range_ratio=0.5,
                           prefix_len=7, exclude=[0, 1])
    assert all(27 <= r.prompt_len <= 67 and 5 <= r.output_len <= 15 for r in reqs)
    assert len({tuple(r.prompt[:7]) for r in reqs}) == 1 and len({tuple(r.prompt) for r in reqs}) == 200
    assert all(2 <= t < 50 for r in reqs for t in r.prompt)
    assert len({r.prompt_len for r in reqs}) > 10


def test_file_requests_formats(tmp_path) -> None:
    (tmp_path / "p.jsonl").write_text('{"prompt": "a b", "output_len": 3}\n{"prompt": "c"}\n')
    (tmp_path / "s.json").write_text(json.dumps([{"conversations": [{"from": "human", "value": "hi there"},
                                                                    {"from": "gpt", "value": "one two three"}]}]))
    (tmp_path / "t.txt").write_text("first\n\nsecond\n")
    count = lambda s: len(s.split())  # noqa: E731
    jl = file_requests(tmp_path / "p.jsonl", 2, 9, count)
    assert sorted((r.prompt, r.prompt_len, r.output_len) for r in jl) == [("a b", 2, 3), ("c", 1, 9)]
    sg = file_requests(tmp_path / "s.json", 3, 9, count)
    assert [(r.prompt, r.output_len) for r in sg] == [("hi there", 3)] * 3
    assert {r.prompt for r in file_requests(tmp_path / "t.txt", 2, 4, None)} == {"first", "second"}
    (tmp_path / "bad.jsonl").write_text('{"text": 1}\n')
    with pytest.raises(LoadgenError, match="format"):
        file_requests(tmp_path / "bad.jsonl", 1, 4, None)


def test_summary_statistics_by_hand() -> None:
    results = [RequestResult(True, 10, output_tokens=5, ttft=0.1 * (i + 1), itls=[0.01] * 4, latency=1.0)
               for i in range(10)] + [RequestResult(False, 10, error="HTTP 429: full")]
    s = summarize(results, duration=2.0)
    assert (s["completed"], s["failed"], s["failures"]) == (10, 1, {"HTTP 429": 1})
    assert s["output_throughput"] == 25.0 and s["request_throughput"] == 5.0
    assert s["ttft_ms"]["mean"] == pytest.approx(550.0) and s["ttft_ms"]["median"] == pytest.approx(550.0)
    assert s["ttft_ms"]["p95"] == pytest.approx(955.0)  # linear interpolation between 900 and 1000
    assert s["tpot_ms"]["mean"] == pytest.approx((1000 - 550) / 4)
    assert s["itl_ms"]["p99"] == pytest.approx(10.0)


def test_bench_against_a_running_server_and_offline(server, tiny_dir, tmp_path, capsys) -> None:
    cfg = BenchServeConfig(base_url=server.url, model=tiny_dir, num_prompts=12, input_len=16, output_len=8,
                           request_rate=50.0, max_concurrency=4, offline=True, num_kv_blocks=256,
                           save_result=tmp_path / "r.json")
    out = bench_serve(cfg)
    run = out["runs"][0]
    assert (run["completed"], run["failed"], run["total_output_tokens"]) == (12, 0, 96)
    assert run["ttft_ms"]["p95"] > 0 and run["tpot_ms"]["median"] > 0 and len(run["per_request"]) == 12
    assert out["offline"]["total_output_tokens"] == 96 and out["server_over_offline"] > 0
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["runs"][0]["completed"] == 12 and saved["config"]["request_rate"] == 50.0
    printed = capsys.readouterr().out
    assert "Output token throughput" in printed and "of offline" in printed


def test_bench_chat_endpoint_with_saturation_fraction(server, tiny_dir) -> None:
    out = bench_serve(BenchServeConfig(base_url=server.url, tokenizer=tiny_dir, endpoint="chat", num_prompts=6,
                                       input_len=8, output_len=4, saturation_fraction=0.5))
    saturation, half = out["runs"]
    assert saturation["request_rate"] == "inf" and saturation["completed"] == half["completed"] == 6
    assert half["request_rate"] == pytest.approx(0.5 * saturation["request_throughput"])


def test_saturation_phases_send_fresh_prompts_unless_warm_cache(server, tiny_dir) -> None:
    """The measured run must not find the probe's prompts in the prefix cache (a warm-cache TTFT flatters)."""
    common = dict(base_url=server.url, model=tiny_dir, num_prompts=6, input_len=40, output_len=2,
                  saturation_fraction=4.0)
    cold = bench_serve(BenchServeConfig(seed=11, **common))["runs"]
    warm = bench_serve(BenchServeConfig(seed=12, warm_cache=True, **common))["runs"]
    assert all("prefix_cache_hit_rate" in run for run in cold + warm)
    assert cold[1]["prefix_cache_hit_rate"] < 0.2  # random prompts of fresh seeds share little
    assert warm[1]["prefix_cache_hit_rate"] > 0.7  # the same prompts again: their full blocks hit


def test_bench_needs_a_server_or_a_model(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "ember", "bench", "serve", "--dataset", str(tmp_path / "p.txt")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--dataset" in lines[0], proc.stderr


def test_bench_serves_the_model_itself_when_no_url(tiny_dir) -> None:
    out = bench_serve(BenchServeConfig(model=tiny_dir, num_prompts=4, input_len=8, output_len=4, offline=True,
                                       num_kv_blocks=128, threads=1))
    run = out["runs"][0]
    assert run["completed"] == 4 and run["total_output_tokens"] == 16
    assert run["server_cpu_s"] > 0 and out["cpu_offline_over_server"] > 0  # the served process, from /proc
