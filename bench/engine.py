"""Serving-engine benchmarks: ember's paged engine against baselines measured in the same run.

    PYTHONPATH=. python bench/engine.py                       # all four (~15 min on 2 busy cores)
    PYTHONPATH=. python bench/engine.py --only throughput decode --threads 2

1. throughput   64 requests (prompts 32-512, outputs 32-256 tokens, ignore_eos) on the
                bench-50m model (random weights): output tokens/s of LLM.generate with the
                engine's defaults (max_num_batched_tokens 2048, as vLLM's on CPU), once per
                --kv-cache-dtype (the model's fp32, and fp16, which halves the bytes decode
                attention reads; transformers keeps fp32), versus
                transformers' generate in static, left-padded batches of --hf-batch requests
                (each batch decodes until its longest request is done; only requested tokens count),
                twice: in arrival order (the naive use, much of it padding) and sorted by length
                (the careful use). The headline is fp32 KV cache against sorted batches; the fp16
                KV cache rows are lossy and labelled so.
                Both first serve one untimed warm-up batch of other prompts of the same lengths:
                a fresh process pays once for growing its heap (transformers' first batch took
                54 s against 34-37 s for the same shapes afterwards), which a serving process
                does not pay per request.
2. decode       batch-1 decode tokens/s versus the memory-bandwidth roofline: weight bytes per
                token over the bandwidth of a large tensor copy (STREAM convention: bytes read +
                written per second), measured here; the memcpy convention (bytes copied per
                second) is printed too.
3. prefix       32 requests sharing a 1,024-token prefix submitted together: mean time to first
                token with prefix caching versus without.
4. concurrency  256 simultaneous streams through AsyncLLMEngine with a 0.5 GiB KV pool: all must
                finish; reports failures, preemptions and the peak resident memory.
Timings on a shared machine vary; ratios are within one run. --threads sets torch's threads
for ember and the baselines alike (1 is steadier when other jobs share the cores). Throughput and
decode are also reported per CPU-second of this process (time.process_time), which other jobs
on the machine disturb much less than wall-clock time.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ember.checkpoint.hf import save_model  # noqa: E402
from ember.config import preset  # noqa: E402
from ember.engine import LLM, AsyncLLMEngine, SamplingParams  # noqa: E402
from ember.engine.config import weight_bytes  # noqa: E402
from ember.model.transformer import Transformer  # noqa: E402


def make_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(preset("bench-50m")).eval()


def workload(n: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(3, 32000) for _ in range(rng.randint(32, 512))], rng.randint(32, 256))
            for _ in range(n)]


def bench_throughput(model: Transformer, args: argparse.Namespace) -> None:
    import transformers

    reqs = workload(args.requests)
    # Other prompts (prefix caching must not hit), the lengths of the first static batch.
    warm = [([t - 1 for t in p], o) for p, o in reqs[:args.hf_batch]]
    useful = sum(o for _, o in reqs)
    ember_runs: dict[str, tuple[float, float]] = {}
    for kv_dtype in args.kv_cache_dtype:
        llm = LLM(model, max_num_seqs=args.max_num_seqs, kv_cache_memory=4.0, kv_cache_dtype=kv_dtype)
        llm.generate([p for p, _ in warm],
                     [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for _, o in warm])
        params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for _, o in reqs]
        t, c = time.perf_counter(), time.process_time()
        outs = llm.generate([p for p, _ in reqs], params)
        ember_s, ember_cpu = time.perf_counter() - t, time.process_time() - c
        assert sum(len(o.outputs[0].token_ids) for o in outs) == useful
        ember_runs[kv_dtype] = ember_s, ember_cpu
        print(f"[throughput] ember (kv_cache_dtype={kv_dtype}): {useful} tokens in {ember_s:.1f}s = "
              f"{useful / ember_s:.1f} tok/s ({ember_cpu:.1f} CPU-s; max_num_seqs={args.max_num_seqs}, "
              f"preemptions={llm.engine.scheduler.num_preemptions})", flush=True)
        del llm
    with tempfile.TemporaryDirectory() as tmp:
        save_model(model, tmp)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()

    def hf_batch(batch: list[tuple[list[int], int]]) -> None:
        width = max(len(p) for p, _ in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch])
        new = max(o for _, o in batch)
        with torch.no_grad():
            hf.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                        eos_token_id=None, pad_token_id=0)

    hf_batch(warm)
    # Two orders for the static batches: as the requests come (what a naive user gets: ~40 % of the
    # slots are padding) and sorted by max_tokens then prompt length (what a careful user does with
    # lengths known up front: the least padding a static batcher can have).
    orders = {"arrival order": reqs, "sorted by length": sorted(reqs, key=lambda r: (r[1], len(r[0])))}
    hf_runs: dict[str, tuple[float, float]] = {}
    for label, ordered in orders.items():
        t, c = time.perf_counter(), time.process_time()
        for i in range(0, len(ordered), args.hf_batch):
            hf_batch(ordered[i:i + args.hf_batch])
        hf_runs[label] = time.perf_counter() - t, time.process_time() - c
        hf_s, hf_cpu = hf_runs[label]
        print(f"[throughput] transformers generate, static batches of {args.hf_batch}, {label}: {useful} tokens in "
              f"{hf_s:.1f}s = {useful / hf_s:.1f} tok/s ({hf_cpu:.1f} CPU-s)", flush=True)
    for kv_dtype, (ember_s, ember_cpu) in ember_runs.items():
        lossy = "" if kv_dtype in ("auto", "float32") else ", LOSSY: 16-bit KV cache vs transformers' fp32"
        for label, (hf_s, hf_cpu) in hf_runs.items():
            print(f"[throughput] RATIO ember (kv_cache_dtype={kv_dtype}{lossy}) / transformers ({label}) = "
                  f"{hf_s / ember_s:.2f}x wall-clock, {hf_cpu / ember_cpu:.2f}x CPU time", flush=True)


def copy_bandwidth(clock=time.perf_counter, nbytes: int = 512 * 2**20) -> float:
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(7):
        t = clock()
        dst.copy_(src)
        best = min(best, clock() - t)
    return 2 * nbytes / best  # bytes read + written per second


def bench_decode(model: Transformer, args: argparse.Namespace) -> None:
    llm = LLM(model, max_num_seqs=1, kv_cache_memory=0.5)
    prompt = list(range(100, 132))
    n = args.decode_tokens

    def run(max_tokens: int):
        c = time.process_time()
        out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))[0]
        return out.metrics, time.process_time() - c

    run(8)  # warm up
    wall, cpu = [], []
    for _ in range(3):
        _, prefill_cpu = run(1)
        m, all_cpu = run(n)
        wall.append((n - 1) / (m.finished_time - m.first_token_time))
        cpu.append((n - 1) / (all_cpu - prefill_cpu))
    wb = weight_bytes(model)
    roof_wall, roof_cpu = copy_bandwidth() / wb, copy_bandwidth(time.process_time) / wb
    print(f"[decode] batch-1 decode: {max(wall):.1f} tok/s wall-clock (runs {', '.join(f'{r:.1f}' for r in wall)}), "
          f"{max(cpu):.1f} tok/s per CPU-second; weights {wb / 2**20:.0f} MiB; copy bandwidth "
          f"{roof_wall * wb / 1e9:.1f} GB/s wall, {roof_cpu * wb / 1e9:.1f} GB/s CPU-time -> roofline "
          f"{roof_wall:.1f} / {roof_cpu:.1f} tok/s", flush=True)
    print(f"[decode] RATIO ember / roofline = {max(wall) / roof_wall:.0%} wall-clock, "
          f"{max(cpu) / roof_cpu:.0%} CPU time (target >= 60%); with the memcpy convention (bytes copied "
          f"per second, half the above bandwidth): {2 * max(wall) / roof_wall:.0%} / {2 * max(cpu) / roof_cpu:.0%}",
          flush=True)


def bench_prefix(model: Transformer, args: argparse.Namespace) -> None:
    rng = random.Random(1)
    prefix = [rng.randrange(3, 32000) for _ in range(1024)]
    prompts = [prefix + [rng.randrange(3, 32000) for _ in range(16)] for _ in range(32)]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    ttft = {}
    for caching in (True, False):
        llm = LLM(model, max_num_seqs=32, max_num_batched_tokens=512, kv_cache_memory=2.0,
                  enable_prefix_caching=caching)
        outs = llm.generate(prompts, params)
        ttft[caching] = sum(o.metrics.first_token_time - o.metrics.arrival_time for o in outs) / len(outs)
        stats = llm.engine.stats()
        print(f"[prefix] caching {'on ' if caching else 'off'}: mean TTFT {ttft[caching]:.2f}s; "
              f"prefix cache hits {stats.prefix_cache_hits}/{stats.prefix_cache_queries} tokens", flush=True)
        del llm
    print(f"[prefix] RATIO TTFT without / with caching = {ttft[False] / ttft[True]:.1f}x (target >= 5x)", flush=True)


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def bench_concurrency(model: Transformer, args: argparse.Namespace) -> None:
    engine = AsyncLLMEngine(LLM(model, max_num_seqs=256, max_num_batched_tokens=512, kv_cache_memory=0.5).engine)
    rng = random.Random(2)
    reqs = [([rng.randrange(3, 32000) for _ in range(rng.randint(16, 96))], rng.randint(16, 64)) for _ in range(256)]
    before = rss_bytes()
    peak = [before]

    async def one(i: int, prompt: list[int], n: int) -> tuple[int, str]:
        count, reason = 0, ""
        async for delta in engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0.8, top_p=0.95,
                                                                              max_tokens=n, ignore_eos=True, seed=i)):
            count += len(delta.outputs[0].token_ids) if delta.outputs else 0
            reason = delta.outputs[0].finish_reason if delta.outputs else reason
            peak[0] = max(peak[0], rss_bytes()) if i == 0 or count % 16 == 0 else peak[0]
        return count, reason

    async def main() -> list:
        results = await asyncio.gather(*(one(i, p, n) for i, (p, n) in enumerate(reqs)), return_exceptions=True)
        await engine.shutdown()
        return results

    t = time.perf_counter()
    results = asyncio.run(main())
    dt = time.perf_counter() - t
    failures = [r for r in results if isinstance(r, BaseException)]
    ok = [r for r, (_, n) in zip(results, reqs) if not isinstance(r, BaseException) and r == (n, "length")]
    stats = engine.stats()
    pool = engine.engine.runner.kv_cache
    print(f"[concurrency] 256 streams: {len(ok)} complete, {len(failures)} failed, in {dt:.1f}s "
          f"({sum(r[0] for r in results if not isinstance(r, BaseException)) / dt:.1f} tok/s); "
          f"preemptions {stats.num_preemptions}; KV pool {pool.numel() * pool.element_size() / 2**30:.2f} GiB; "
          f"RSS {before / 2**30:.2f} -> peak {peak[0] / 2**30:.2f} GiB", flush=True)
    if failures:
        print(f"[concurrency] first failure: {failures[0]!r}")


BENCHES = {"throughput": bench_throughput, "decode": bench_decode, "prefix": bench_prefix,
           "concurrency": bench_concurrency}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=list(BENCHES), default=list(BENCHES))
    ap.add_argument("--threads", type=int, default=1, help="torch threads for ember and the baselines")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--hf-batch", type=int, default=16, help="static batch size of the transformers baseline")
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--kv-cache-dtype", nargs="+", default=["auto", "float16"],
                    help="the throughput run's KV cache element types, one ember run each")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = make_model()
    print(f"bench-50m: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, float32, "
          f"{args.threads} thread(s)", flush=True)
    for name in args.only:
        BENCHES[name](model, args)


if __name__ == "__main__":
    main()
