"""Benchmarks. `ember bench serve`: load an OpenAI-compatible server and report its latencies.

    ember bench serve --base-url http://127.0.0.1:8000 --model DIR --num-prompts 200 --request-rate 4
    ember bench serve --model DIR --num-prompts 64 --offline              # starts `ember serve` itself,
                                                                          # then the same work offline
    ember bench serve --model DIR --saturation-fraction 0.8 --save-result run.json
    ember bench serve --base-url URL --dataset sharegpt.json --tokenizer DIR --max-concurrency 32

Prompts are random token ids (--input-len / --output-len, spread by --range-ratio, with an
optional shared --prefix-len; the vocabulary comes from --tokenizer or --model) or a --dataset
file (jsonl {"prompt"}, ShareGPT json, or text lines). Requests arrive as a Poisson process at
--request-rate (inf: all at once), at most --max-concurrency in flight. Without --base-url the
model is served by an `ember serve` subprocess on a free localhost port with the engine flags
given here. --offline then runs the same prompts through `ember.LLM` in this process and prints
the server's output tokens/s as a fraction of the offline engine's. --saturation-fraction F
first sends everything at once to find the saturation request rate, then runs again with
Poisson arrivals at F times it (e.g. P95 TTFT at 80 % load). Each phase sends fresh prompts (seed
--seed for the probe, --seed + 1 for the measured run), so the measured run does not find the probe's
prompts in the prefix cache; --warm-cache resends the probe's prompts instead and labels the run so.
Every run reports the server's prefix-cache hit rate (prompt tokens found / looked up, read from
/metrics before and after) beside its latencies. --save-result writes every figure and per-request
latency as JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ember.atomic import atomic_write_json
from ember.commands.serve import cpu_threads, engine_kwargs, require_serve_extra
from ember.engine.config import EngineConfig
from ember.serve.loadgen import (BenchRequest, LoadgenError, LoadOptions, file_requests, format_summary,
                                 random_requests, run_load, summarize)

log = logging.getLogger("ember.bench")


@dataclass
class BenchServeConfig(EngineConfig):
    """Load-test a server (or a model it serves for the run); engine flags apply to that server."""

    base_url: str | None = field(default=None, kw_only=True, metadata={
        "help": "server to load, e.g. http://127.0.0.1:8000 (unset: serve --model for the run)"})
    model: Path | None = field(default=None, kw_only=True, metadata={
        "help": "model folder: served when no --base-url, run by --offline, vocabulary of random prompts"})
    tokenizer: Path | None = field(default=None, kw_only=True, metadata={"help": "tokenizer folder (default: --model)"})
    served_model_name: str | None = field(default=None, kw_only=True, metadata={
        "help": "the `model` sent in requests (default: the first of /v1/models)"})
    endpoint: Literal["completions", "chat"] = field(default="completions", kw_only=True,
                                                     metadata={"help": "API to load"})
    dataset: str = field(default="random", kw_only=True, metadata={
        "help": "'random', or a prompts file: .jsonl {\"prompt\"}, ShareGPT .json, or .txt lines"})
    num_prompts: int = field(default=200, kw_only=True, metadata={"help": "requests to send"})
    input_len: int = field(default=256, kw_only=True, metadata={"help": "random prompts: mean prompt tokens"})
    output_len: int = field(default=128, kw_only=True, metadata={"help": "mean output tokens (max_tokens)"})
    range_ratio: float = field(default=0.0, kw_only=True, metadata={
        "help": "random lengths uniform in [len*(1-r), len*(1+r)]"})
    prefix_len: int = field(default=0, kw_only=True, metadata={"help": "random prompts: shared prefix tokens"})
    request_rate: float = field(default=math.inf, kw_only=True, metadata={
        "help": "Poisson arrivals per second (inf: all at once)"})
    max_concurrency: int | None = field(default=None, kw_only=True, metadata={"help": "most requests in flight"})
    saturation_fraction: float | None = field(default=None, kw_only=True, metadata={
        "help": "measure the saturation rate first, then run at this fraction of it (fresh prompts)"})
    warm_cache: bool = field(default=False, kw_only=True, metadata={
        "help": "with --saturation-fraction: resend the probe's prompts, so the measured run hits the prefix cache"})
    ignore_eos: bool = field(default=True, kw_only=True, metadata={"help": "generate exactly the output lengths"})
    temperature: float = field(default=0.0, kw_only=True, metadata={"help": "sampling temperature"})
    offline: bool = field(default=False, kw_only=True, metadata={
        "help": "also run the workload through ember.LLM in this process and compare"})
    save_result: Path | None = field(default=None, kw_only=True, metadata={"help": "write the results as JSON"})
    api_key: str | None = field(default=None, kw_only=True, metadata={"help": "bearer token for the server"})
    timeout: float = field(default=600.0, kw_only=True, metadata={"help": "seconds per request"})
    dtype: str = field(default="float32", kw_only=True, metadata={"help": "served/offline model dtype"})
    threads: int | None = field(default=None, kw_only=True, metadata={
        "help": "torch threads of the served model and the offline run (default: all cores but one)"})


def workload(cfg: BenchServeConfig, seed: int | None = None) -> tuple[list[BenchRequest], Any]:
    """The prompts of a run (drawn with `seed`, default --seed) and the tokenizer that counted them (or None)."""
    seed = cfg.seed if seed is None else seed
    tok = None
    if cfg.tokenizer or cfg.model:
        from ember.tokenizer import load_tokenizer

        tok = load_tokenizer(cfg.tokenizer or cfg.model)
    if cfg.dataset == "random":
        if tok is None:
            raise LoadgenError("random prompts need the vocabulary: pass --model DIR or --tokenizer DIR")
        return random_requests(cfg.num_prompts, cfg.input_len, cfg.output_len, tok.vocab_size, seed,
                               cfg.range_ratio, cfg.prefix_len, exclude=tok.all_special_ids), tok
    count = (lambda s: len(tok.encode(s))) if tok is not None else None  # noqa: E731
    return file_requests(Path(cfg.dataset), cfg.num_prompts, cfg.output_len, count, seed), tok


def _flags(cfg: BenchServeConfig) -> list[str]:
    out = []
    for name, value in engine_kwargs(cfg).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        elif value is not None:
            out += [flag, str(value)]
    return out


@contextlib.contextmanager
def served(cfg: BenchServeConfig) -> Iterator[tuple[str, int]]:
    """`ember serve --model` in a subprocess on a free port for the run (SIGTERM at the end): (url, pid)."""
    import httpx

    if cfg.model is None:
        raise LoadgenError("give --base-url URL (a running server) or --model DIR (served for the run)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "ember", "serve", "--model", str(cfg.model), "--port", str(port),
           "--max-queue-len", str(cfg.num_prompts), "--log-interval", "0", "--no-access-log", "--dtype", cfg.dtype,
           *(["--tokenizer", str(cfg.tokenizer)] if cfg.tokenizer else []),
           "--threads", str(cpu_threads(cfg.threads)), *_flags(cfg)]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                raise LoadgenError(f"`ember serve` exited with status {proc.returncode} before it was ready")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise LoadgenError("`ember serve` did not become ready in 600 s")
            time.sleep(0.25)
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_offline(cfg: BenchServeConfig, requests: list[BenchRequest]) -> dict[str, float]:
    """The same prompts and lengths through ember.LLM, all submitted together."""
    import torch

    from ember.engine import LLM, SamplingParams

    torch.set_num_threads(cpu_threads(cfg.threads))  # the server's count, for a like-for-like ratio
    llm = LLM(cfg.model, cfg.tokenizer, dtype=cfg.dtype, **engine_kwargs(cfg))
    params = [SamplingParams(temperature=cfg.temperature, max_tokens=r.output_len, ignore_eos=cfg.ignore_eos,
                             seed=cfg.seed) for r in requests]
    llm.generate(requests[0].prompt, SamplingParams(max_tokens=2))  # warm-up, as the load run has
    t0, c0 = time.perf_counter(), time.process_time()
    outs = llm.generate([r.prompt for r in requests], params)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return {"duration_s": seconds, "cpu_s": cpu, "total_output_tokens": tokens, "output_throughput": tokens / seconds,
            "request_throughput": len(requests) / seconds}


def _cpu_seconds(pid: int | None) -> float | None:
    """CPU time (user + system) a local process has used so far, from /proc; None where unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, TypeError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def prefix_cache_counts(url: str, api_key: str | None) -> tuple[float, float] | None:
    """(prompt tokens looked up, found) in the server's prefix cache so far, from /metrics; None if unreadable."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        text = httpx.get(url + "/metrics", headers=headers, timeout=10).text
    except httpx.HTTPError:
        return None
    totals = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ("ember:prefix_cache_queries_total", "ember:prefix_cache_hits_total"):
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    if len(totals) != 2:
        return None  # not an ember server, or one without these counters
    return totals["ember:prefix_cache_queries_total"], totals["ember:prefix_cache_hits_total"]


def _load(cfg: BenchServeConfig, url: str, pid: int | None, requests: list[BenchRequest], rate: float,
          decode, seed: int) -> dict[str, Any]:
    opts = LoadOptions(rate, cfg.max_concurrency, cfg.endpoint, cfg.served_model_name, cfg.ignore_eos,
                       cfg.temperature, seed, cfg.api_key, cfg.timeout)
    cache0 = prefix_cache_counts(url, cfg.api_key)
    cpu0 = _cpu_seconds(pid)
    results, seconds = asyncio.run(run_load(url, requests, opts, decode))
    cpu1 = _cpu_seconds(pid)
    cache1 = prefix_cache_counts(url, cfg.api_key)
    summary = summarize(results, seconds)
    if cache0 is not None and cache1 is not None:
        queries, hits = cache1[0] - cache0[0], cache1[1] - cache0[1]
        summary["prefix_cache_hit_rate"] = hits / queries if queries else 0.0
    if cpu0 is not None and cpu1 is not None:
        summary["server_cpu_s"] = cpu1 - cpu0  # the served process (engine + HTTP), warm-up request included
    summary["request_rate"] = _jsonable(rate)
    summary["per_request"] = [dataclasses.asdict(r) for r in results]
    return summary


def _jsonable(v: Any) -> Any:
    """Paths as strings and infinity as "inf" (JSON has no infinity)."""
    if isinstance(v, Path):
        return str(v)
    return "inf" if isinstance(v, float) and math.isinf(v) else v


def bench_serve(cfg: BenchServeConfig) -> dict[str, Any]:
    require_serve_extra()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per request
    if cfg.warm_cache and cfg.saturation_fraction is None:
        raise LoadgenError("--warm-cache applies to --saturation-fraction runs (it resends the probe's prompts)")
    requests, tok = workload(cfg)
    decode = tok.decode if tok is not None else None
    result: dict[str, Any] = {"config": {k: _jsonable(v) for k, v in dataclasses.asdict(cfg).items()}, "runs": []}
    seed = cfg.seed
    with (contextlib.nullcontext((cfg.base_url, None)) if cfg.base_url else served(cfg)) as (url, pid):
        if cfg.saturation_fraction is not None:
            saturation = _load(cfg, url, pid, requests, math.inf, decode, seed)
            print(format_summary(saturation, "saturation probe (all at once)"))
            result["runs"].append(saturation)
            rate = cfg.saturation_fraction * saturation["request_throughput"]
            if not cfg.warm_cache:  # fresh prompts: the probe's are in the prefix cache now
                seed = cfg.seed + 1
                requests, _ = workload(cfg, seed)
        else:
            rate = cfg.request_rate
        run = _load(cfg, url, pid, requests, rate, decode, seed)
        title = "all at once" if math.isinf(rate) else f"Poisson {rate:.2f} req/s"
        if cfg.warm_cache:
            title += ", WARM prefix cache (the probe's prompts again)"
        print(format_summary(run, f"ember bench serve: {title}"))
        result["runs"].append(run)
    if cfg.offline:
        if cfg.model is None:
            raise LoadgenError("--offline runs the model in this process: pass --model DIR")
        off = run_offline(cfg, requests)
        result["offline"] = off
        ratio = run["output_throughput"] / off["output_throughput"]
        result["server_over_offline"] = ratio
        print(f"offline LLM: {off['total_output_tokens']} tokens in {off['duration_s']:.2f}s = "
              f"{off['output_throughput']:.1f} tok/s; server {run['output_throughput']:.1f} tok/s = "
              f"{ratio:.1%} of offline")
        if "server_cpu_s" in run:  # less disturbed by other jobs on the machine than wall-clock time
            result["cpu_offline_over_server"] = off["cpu_s"] / run["server_cpu_s"]
            print(f"CPU time: offline {off['cpu_s']:.1f}s, server process {run['server_cpu_s']:.1f}s "
                  f"(offline / server = {result['cpu_offline_over_server']:.1%})")
    if cfg.save_result is not None:
        atomic_write_json(cfg.save_result, result)
        print(f"results written to {cfg.save_result}")
    return result


SUBCOMMANDS = {"serve": (BenchServeConfig, bench_serve)}
