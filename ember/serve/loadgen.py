"""The serving benchmark's load generator: many streamed requests against an OpenAI-compatible server.

    reqs = random_requests(200, input_len=256, output_len=128, vocab_size=32000, seed=0)
    results, seconds = asyncio.run(run_load("http://127.0.0.1:8000", reqs, LoadOptions(request_rate=4.0)))
    summary = summarize(results, seconds)     # request/s, output tok/s, TTFT / TPOT / ITL / E2E stats

One short request goes first, untimed (a warm-up, and a clear error if the server refuses).
Arrivals are a Poisson process at `request_rate` (exponential gaps, seeded) or all at once
(rate inf); `max_concurrency` caps requests in flight. Every request streams (with
`stream_options.include_usage`, so output tokens are the server's count) and is timed at the
client: TTFT = first chunk with text, ITL = gaps between later chunks, TPOT = (E2E - TTFT) /
(output tokens - 1). Random prompts are token ids (sent as-is to /v1/completions, decoded for
chat) so their lengths are exact; file prompts come from jsonl ({"prompt", optional
"output_len"}), ShareGPT json (first human turn; the reply's length as output_len) or text lines.
Statistics follow vLLM's benchmark_serving (mean, median, P95, P99; milliseconds).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ember.errors import EmberError


class LoadgenError(EmberError):
    """A benchmark input that cannot be used (dataset file, server answer)."""


@dataclass
class BenchRequest:
    prompt: str | list[int]
    prompt_len: int
    output_len: int


@dataclass
class LoadOptions:
    request_rate: float = math.inf  # requests/s of the Poisson process; inf: all at once
    max_concurrency: int | None = None
    endpoint: str = "completions"  # or "chat"
    model: str | None = None  # the `model` field; None: the first of /v1/models
    ignore_eos: bool = True  # outputs of exactly output_len tokens (vLLM's --ignore-eos)
    temperature: float = 0.0
    seed: int = 0
    api_key: str | None = None
    timeout: float = 600.0


@dataclass
class RequestResult:
    ok: bool
    prompt_len: int
    output_tokens: int = 0
    ttft: float = 0.0
    itls: list[float] = field(default_factory=list)
    latency: float = 0.0
    error: str = ""


# ---- workloads -------------------------------------------------------------------------------
def random_requests(n: int, input_len: int, output_len: int, vocab_size: int, seed: int = 0,
                    range_ratio: float = 0.0, prefix_len: int = 0,
                    exclude: Sequence[int] = ()) -> list[BenchRequest]:
    """n prompts of random token ids; lengths uniform in [len * (1 - r), len * (1 + r)], a shared prefix."""
    if not 0 <= range_ratio < 1:
        raise LoadgenError(f"--range-ratio must be in [0, 1), got {range_ratio}")
    rng = random.Random(seed)
    banned = set(exclude)
    pool = [t for t in range(vocab_size) if t not in banned]
    prefix = [rng.choice(pool) for _ in range(prefix_len)]

    def length(mean: int) -> int:
        return max(1, rng.randint(int(mean * (1 - range_ratio)), int(math.ceil(mean * (1 + range_ratio)))))

    out = []
    for _ in range(n):
        ids = prefix + [rng.choice(pool) for _ in range(length(input_len))]
        out.append(BenchRequest(ids, len(ids), length(output_len)))
    return out


def file_requests(path: Path, n: int, output_len: int, count_tokens: Callable[[str], int] | None,
                  seed: int = 0) -> list[BenchRequest]:
    """Up to n prompts from a jsonl, ShareGPT json or text file, shuffled with the seed."""
    if not path.is_file():
        raise LoadgenError(f"--dataset {path} is not a file: give 'random', a .jsonl, a ShareGPT .json or a .txt")
    text = path.read_text(encoding="utf-8", errors="replace")
    items: list[tuple[str, int | None]] = []
    try:
        if path.suffix == ".jsonl":
            for line in filter(str.strip, text.splitlines()):
                rec = json.loads(line)
                items.append((rec["prompt"], rec.get("output_len") or rec.get("max_tokens")))
        elif path.suffix == ".json":
            for conv in json.loads(text):
                turns = conv["conversations"]
                if len(turns) >= 2 and count_tokens is not None:
                    items.append((turns[0]["value"], max(1, count_tokens(turns[1]["value"]))))
                elif turns:
                    items.append((turns[0]["value"], None))
        else:
            items = [(line, None) for line in text.splitlines() if line.strip()]
    except (ValueError, KeyError, TypeError) as e:
        raise LoadgenError(f"--dataset {path}: not the expected format ({type(e).__name__}: {e}); use jsonl "
                           "lines {\"prompt\": ...}, ShareGPT json or one prompt per line") from None
    if not items:
        raise LoadgenError(f"--dataset {path} holds no prompts")
    random.Random(seed).shuffle(items)
    return [BenchRequest(p, count_tokens(p) if count_tokens else 0, int(o or output_len))
            for p, o in (items * (n // len(items) + 1))[:n]]


def arrival_times(n: int, rate: float, seed: int = 0) -> list[float]:
    """Send times (s from the start) of a Poisson process at `rate`; all 0 for rate inf."""
    if rate <= 0:
        raise LoadgenError(f"--request-rate must be > 0 (inf: all at once), got {rate}")
    if math.isinf(rate):
        return [0.0] * n
    rng = np.random.default_rng(seed)
    return np.cumsum(rng.exponential(1.0 / rate, size=n)).tolist()


# ---- sending ---------------------------------------------------------------------------------
def _payload(req: BenchRequest, opts: LoadOptions, decode: Callable[[list[int]], str] | None) -> dict[str, Any]:
    common = {"model": opts.model, "max_tokens": req.output_len, "temperature": opts.temperature,
              "ignore_eos": opts.ignore_eos, "stream": True, "stream_options": {"include_usage": True}}
    if opts.endpoint == "chat":
        text = req.prompt if isinstance(req.prompt, str) else (decode(req.prompt) if decode else "")
        return {**common, "messages": [{"role": "user", "content": text}]}
    return {**common, "prompt": req.prompt}


async def _send(client: Any, url: str, payload: dict[str, Any], prompt_len: int) -> RequestResult:
    res = RequestResult(ok=False, prompt_len=prompt_len)
    start = last = time.perf_counter()
    chunks = 0
    try:
        async with client.stream("POST", url, json=payload) as r:
            if r.status_code != 200:
                body = (await r.aread()).decode(errors="replace")
                res.error = f"HTTP {r.status_code}: {body[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = str(chunk["error"].get("message", chunk["error"]))[:200]
                    return res
                if chunk.get("usage") and not chunk.get("choices"):
                    res.output_tokens = chunk["usage"]["completion_tokens"]
                    continue
                choice = (chunk.get("choices") or [{}])[0]
                piece = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
                if piece:
                    now = time.perf_counter()
                    if chunks == 0:
                        res.ttft = now - start
                    else:
                        res.itls.append(now - last)
                    last, chunks = now, chunks + 1
    except Exception as e:  # a transport error is one failed request, not the end of the run
        res.error = f"{type(e).__name__}: {e}"[:200]
        return res
    res.latency = time.perf_counter() - start
    res.output_tokens = res.output_tokens or chunks
    res.ok = chunks > 0 or res.output_tokens > 0
    if not res.ok:
        res.error = "no output"
    return res


async def run_load(base_url: str, requests: list[BenchRequest], opts: LoadOptions,
                   decode: Callable[[list[int]], str] | None = None) -> tuple[list[RequestResult], float]:
    """Send every request on the schedule; returns their results (in order) and the wall-clock seconds."""
    import httpx

    root = base_url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {opts.api_key}"} if opts.api_key else {}
    width = opts.max_concurrency or len(requests)
    limits = httpx.Limits(max_connections=width, max_keepalive_connections=width)
    async with httpx.AsyncClient(timeout=opts.timeout, headers=headers, limits=limits) as client:
        if opts.model is None:
            try:
                models = (await client.get(f"{root}/v1/models")).json()["data"]
                opts.model = models[0]["id"]
            except Exception as e:
                raise LoadgenError(f"cannot list the models of {root}/v1/models ({type(e).__name__}: {e}): "
                                   "is the server up? (or pass --served-model-name)") from None
        url = f"{root}/v1/{'chat/completions' if opts.endpoint == 'chat' else 'completions'}"
        probe = BenchRequest(requests[0].prompt, requests[0].prompt_len, 2)  # warm-up, and a clear error
        first = await _send(client, url, _payload(probe, opts, decode), probe.prompt_len)
        if not first.ok:
            raise LoadgenError(f"the first test request to {url} failed: {first.error}")
        gate = asyncio.Semaphore(opts.max_concurrency) if opts.max_concurrency else None
        times = arrival_times(len(requests), opts.request_rate, opts.seed)
        t0 = time.perf_counter()

        async def one(req: BenchRequest, at: float) -> RequestResult:
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - t0)))
            if gate is None:
                return await _send(client, url, _payload(req, opts, decode), req.prompt_len)
            async with gate:
                return await _send(client, url, _payload(req, opts, decode), req.prompt_len)

        results = await asyncio.gather(*(one(r, t) for r, t in zip(requests, times)))
        return list(results), time.perf_counter() - t0


# ---- statistics ------------------------------------------------------------------------------
def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "median": 0.0, "p95": 0.0, "p99": 0.0}
    a = np.asarray(values) * 1000.0  # milliseconds
    return {"mean": float(a.mean()), "median": float(np.median(a)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99))}


def summarize(results: list[RequestResult], duration: float) -> dict[str, Any]:
    """vLLM's benchmark figures for one run (latencies in ms)."""
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "completed": len(ok), "failed": len(results) - len(ok),
        "failures": dict(Counter(r.error.split(":")[0] for r in results if not r.ok)),
        "duration_s": duration, "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "ttft_ms": _stats([r.ttft for r in ok]), "tpot_ms": _stats(tpots),
        "itl_ms": _stats([x for r in ok for x in r.itls]), "e2el_ms": _stats([r.latency for r in ok]),
    }


def format_summary(s: dict[str, Any], title: str) -> str:
    lines = [f"{'=' * 16} {title} {'=' * 16}",
             f"{'Successful requests:':<34}{s['completed']}",
             f"{'Failed requests:':<34}{s['failed']}" + (f"  {s['failures']}" if s["failures"] else ""),
             f"{'Benchmark duration (s):':<34}{s['duration_s']:.2f}",
             f"{'Total input tokens:':<34}{s['total_input_tokens']}",
             f"{'Total generated tokens:':<34}{s['total_output_tokens']}",
             f"{'Request throughput (req/s):':<34}{s['request_throughput']:.2f}",
             f"{'Output token throughput (tok/s):':<34}{s['output_throughput']:.1f}",
             f"{'Total token throughput (tok/s):':<34}{s['total_token_throughput']:.1f}"]
    for key, name in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2el_ms", "E2E latency")):
        st = s[key]
        lines.append(f"{name + ' (ms):':<34}mean {st['mean']:.1f}  median {st['median']:.1f}  "
                     f"P95 {st['p95']:.1f}  P99 {st['p99']:.1f}")
    if "prefix_cache_hit_rate" in s:
        lines.append(f"{'Prefix cache hit rate:':<34}{s['prefix_cache_hit_rate']:.1%} of prompt tokens")
    return "\n".join(lines)
