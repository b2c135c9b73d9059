"""Attention-kernel micro-benchmark, and INT8 decode against the engine's own fp32 path.

    PYTHONPATH=. .venv/bin/python bench/native_kernels.py --threads 2
    PYTHONPATH=. .venv/bin/python bench/native_kernels.py --threads 2 --only quant --smollm2

Shapes are bench-50m's attention (8 query heads, 8 KV heads, head_dim 64), fp32 everywhere, all
contenders on the same torch threads (the native kernels run on torch's own OpenMP pool).

1. prefill   a fresh causal prompt of 128 / 512 / 2048 tokens:
               ember     native.prefill_attention (kernels/prefill_attention.c) on (T, H, D)
               sdpa-eng  ember.model.attention.sdpa, causal, on the (1, T, H, D) views: what the
                         engine calls when the native kernels are off (EMBER_NATIVE=0)
               sdpa      F.scaled_dot_product_attention, causal, on contiguous (1, H, T, D):
                         torch's best layout, the transposes done outside the clock
2. decode    one new token per sequence for batches of 1 / 16 / 64 sequences with contexts of
             256-2048 tokens, K/V in a paged pool of 16-token blocks scattered at random:
               ember     AttnMetadata.attend with the native paged kernel (kernels/paged_attention.c)
               gathered  AttnMetadata.attend with the native kernels withheld: the PyTorch path
                         (keys gathered into a workspace, matmul, softmax, embedding_bag over values)
               sdpa      F.scaled_dot_product_attention over K/V already contiguous per sequence,
                         padded to the longest with a mask: no paging and no gather, so it flatters
                         torch (a paged server would first have to gather)
             Both AttnMetadata contenders also write the step's K/V (the engine's kv_write), and
             their per-step index tensors are built before the clock, as the engine shares them
             across layers.
3. quant     batch-1 greedy decode tok/s through the engine (LLM, temperature 0, one sequence):
             the fp32 model (native kernels) against the same model after ember.quant INT8
             (Int8Linear: ember's native int8 kernel over 1-128 rows, kernels/quant_linear.c,
             fp32 activations); the naive
             decoder (ember.generate, row-major fp32 matmuls) is timed alongside, as the README's
             "INT8 1.56x fp32" was measured against it.

Every figure is the median over --reps repetitions in which the contenders alternate (their order
rotates each repetition), so load from other jobs hits them alike; outputs are compared (max abs
difference) before any timing. On a shared machine absolute times are noisy; read the ratios.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import ember
from ember.config import preset
from ember.engine import LLM, SamplingParams, native
from ember.engine.attn_metadata import AttnMetadata, Workspace
from ember.model.attention import AttnSpec, sdpa
from ember.model.generate import generate
from ember.model.transformer import Transformer
from ember.quant import QuantConfig, quantize_model

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 8, 8, 64, 16  # bench-50m; the engine's default block size
SPEC = AttnSpec(layer_idx=0, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                scale=1 / math.sqrt(HEAD_DIM), sliding_window=None, alibi=False)


def interleaved(contenders: dict[str, Callable[[], object]], reps: int, target_s: float = 0.02) -> dict[str, float]:
    """Median seconds per call of each contender, alternating them each repetition.

    Each sample averages enough calls to last ~target_s (sized on the slowest contender), so
    timer resolution does not matter for the fast ones.
    """
    for fn in contenders.values():
        fn()  # warm-up: workspaces, first-touch pages, kernel selection
    slowest = 0.0
    for fn in contenders.values():
        t0 = time.perf_counter()
        fn()
        slowest = max(slowest, time.perf_counter() - t0)
    inner = max(1, int(target_s / max(slowest, 1e-6)))
    names = list(contenders)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = contenders[name]
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter() - t0) / inner)
    return {n: statistics.median(v) for n, v in samples.items()}


def report(label: str, times: dict[str, float], diffs: dict[str, float]) -> None:
    ours = times["ember"]
    parts = [f"{n} {t * 1e3:8.3f} ms" for n, t in times.items()]
    ratios = [f"{n}/ember {t / ours:5.2f}x" for n, t in times.items() if n != "ember"]
    agree = [f"|ember-{n}| {d:.1e}" for n, d in diffs.items()]
    print(f"{label:<24} " + "  ".join(parts) + "   " + "  ".join(ratios) + "   " + "  ".join(agree), flush=True)


def prefill_case(T: int, reps: int, g: torch.Generator) -> None:
    q, k, v = (torch.randn(T, h, HEAD_DIM, generator=g) for h in (HEADS, KV_HEADS, KV_HEADS))
    qt, kt, vt = (x.transpose(0, 1).unsqueeze(0).contiguous() for x in (q, k, v))  # (1, H, T, D)
    scratch: dict[str, torch.Tensor] = {}
    out = torch.empty(T, HEADS, HEAD_DIM)

    def buffer(n: int) -> torch.Tensor:  # the engine's Workspace.get, reused between calls
        if "s" not in scratch or scratch["s"].numel() < n:
            scratch["s"] = torch.empty(n)
        return scratch["s"][:n]

    contenders = {
        "ember": lambda: native.prefill_attention(q, k, v, 0, SPEC.scale, None, buffer, out),
        "sdpa-eng": lambda: sdpa(q[None], k[None], v[None], SPEC, None, is_causal=True),
        "sdpa": lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=SPEC.scale),
    }
    ref = contenders["ember"]()
    if ref is None:
        raise SystemExit("the native prefill kernel does not apply here (are the native kernels built?)")
    ref = ref.clone()
    diffs = {"sdpa-eng": (ref - contenders["sdpa-eng"]()[0]).abs().max().item(),
             "sdpa": (ref - contenders["sdpa"]()[0].transpose(0, 1)).abs().max().item()}
    report(f"T={T}", interleaved(contenders, reps), diffs)


def bench_prefill(reps: int) -> None:
    print("\n[prefill] causal attention of a fresh prompt, fp32 (ratio > 1: ember faster)")
    g = torch.Generator().manual_seed(0)
    for T in (128, 512, 2048):
        prefill_case(T, reps, g)


def _paged_step(contexts: list[int], g: torch.Generator):
    """A one-layer pool holding each sequence's context in randomly placed blocks, and one new
    query token per sequence (whose K/V the step writes at the last position)."""
    nblocks = [(c + BLOCK - 1) // BLOCK for c in contexts]
    pool = torch.randn(1, 2, sum(nblocks), KV_HEADS, BLOCK, HEAD_DIM, generator=g)
    order = torch.randperm(sum(nblocks), generator=g).tolist()
    tables, at = [], 0
    for n in nblocks:
        tables.append(order[at:at + n])
        at += n
    seqs = [(t, c - 1, 1) for t, c in zip(tables, contexts)]  # c - 1 cached, 1 computed now
    B = len(contexts)
    q = torch.randn(1, B, HEADS, HEAD_DIM, generator=g)
    k_new, v_new = (torch.randn(1, B, KV_HEADS, HEAD_DIM, generator=g) for _ in range(2))
    return pool, tables, seqs, q, k_new, v_new


def _contiguous_kv(pool: torch.Tensor, tables: list[list[int]], contexts: list[int]):
    """(B, Hkv, Lmax, D) keys and values copied out of the pool, and a (B, 1, 1, Lmax) visibility mask."""
    L = max(contexts)
    B = len(contexts)
    keys, values = torch.zeros(B, KV_HEADS, L, HEAD_DIM), torch.zeros(B, KV_HEADS, L, HEAD_DIM)
    for i, (table, c) in enumerate(zip(tables, contexts)):
        for dst, src in ((keys, pool[0, 0]), (values, pool[0, 1])):
            dst[i, :, :c] = src[table].permute(1, 0, 2, 3).reshape(KV_HEADS, -1, HEAD_DIM)[:, :c]
    mask = (torch.arange(L)[None, :] < torch.tensor(contexts)[:, None])[:, None, None, :]
    return keys, values, mask


def bench_decode(reps: int) -> None:
    print("\n[decode] one token per sequence over a paged fp32 KV cache (ratio > 1: ember faster)")
    g = torch.Generator().manual_seed(1)
    cases = [("B=1 ctx=256", [256]), ("B=1 ctx=2048", [2048])]
    for B in (16, 64):
        ctx = torch.randint(256, 2049, (B,), generator=g).tolist()
        cases.append((f"B={B} ctx=256-2048", ctx))
    for label, contexts in cases:
        decode_case(label, contexts, reps, g)


def decode_case(label: str, contexts: list[int], reps: int, g: torch.Generator) -> None:
    pool, tables, seqs, q, k_new, v_new = _paged_step(contexts, g)
    with_native = AttnMetadata.build(pool, BLOCK, seqs, Workspace())
    if with_native.native is None:
        raise SystemExit("the native paged kernel does not apply here (are the native kernels built?)")
    gathered = AttnMetadata.build(pool, BLOCK, seqs, Workspace())
    gathered.native = None  # what the engine runs when the kernels are off
    # The step's own K/V go in first, so the contiguous copy below holds the same keys.
    with_native.attend(q, k_new, v_new, SPEC)
    keys, values, mask = _contiguous_kv(pool, tables, contexts)
    qs = q[0].unsqueeze(2)  # (B, H, 1, D)
    mask = None if len(contexts) == 1 else mask

    contenders = {
        "ember": lambda: with_native.attend(q, k_new, v_new, SPEC),
        "gathered": lambda: gathered.attend(q, k_new, v_new, SPEC),
        "sdpa": lambda: F.scaled_dot_product_attention(qs, keys, values, attn_mask=mask, scale=SPEC.scale),
    }
    ref = contenders["ember"]()[0]
    diffs = {"gathered": (ref - contenders["gathered"]()[0]).abs().max().item(),
             "sdpa": (ref - contenders["sdpa"]()[:, :, 0]).abs().max().item()}
    report(f"{label} ({sum(contexts)} keys)", interleaved(contenders, reps), diffs)


def _engine_decode_tps(llm: LLM, prompt: list[int], tokens: int) -> float:
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True))[0]
    m = out.metrics
    return (tokens - 1) / (m.finished_time - m.first_token_time)  # decode only: prefill excluded


def _naive_decode_tps(model: Transformer, prompt: list[int], tokens: int) -> float:
    ids = torch.tensor([prompt])
    t0 = time.perf_counter()
    generate(model, ids, tokens)
    return tokens / (time.perf_counter() - t0)  # includes a 32-token prefill, alike for both


def bench_quant(name: str, base: Transformer, reps: int, tokens: int) -> None:
    int8 = quantize_model(copy.deepcopy(base), QuantConfig(method="int8"))
    prompt = [(100 + i) % base.config.vocab_size for i in range(32)]
    engines = {"fp32": LLM(base, max_num_seqs=1, kv_cache_memory=0.5),
               "int8": LLM(int8, max_num_seqs=1, kv_cache_memory=0.5)}
    runs: dict[str, Callable[[int], float]] = {
        "engine fp32": lambda n: _engine_decode_tps(engines["fp32"], prompt, n),
        "engine int8": lambda n: _engine_decode_tps(engines["int8"], prompt, n),
        "naive fp32": lambda n: _naive_decode_tps(base, prompt, n),
        "naive int8": lambda n: _naive_decode_tps(int8, prompt, n),
    }
    for fn in runs.values():
        fn(8)  # warm-up
    speeds: dict[str, list[float]] = {k: [] for k in runs}
    names = list(runs)
    for r in range(reps):
        for key in names[r % len(names):] + names[:r % len(names)]:
            speeds[key].append(runs[key](tokens))
    med = {k: statistics.median(v) for k, v in speeds.items()}
    print(f"\n[quant] {name}: batch-1 greedy decode, {tokens} tokens, median of {reps} interleaved rounds "
          f"(tok/s; engine: decode only, naive: incl. a 32-token prefill)")
    for k, v in speeds.items():
        print(f"  {k:<12} {med[k]:7.1f}   rounds " + " ".join(f"{x:.1f}" for x in v))
    print(f"  RATIO int8/fp32 through the engine (fp32 on native kernels): {med['engine int8'] / med['engine fp32']:.2f}x")
    print(f"  RATIO int8/fp32 through the naive decoder (the README's basis): {med['naive int8'] / med['naive fp32']:.2f}x")
    print(f"  RATIO engine fp32 / naive int8: {med['engine fp32'] / med['naive int8']:.2f}x", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=0, help="torch (and kernel) threads (0: PyTorch's default)")
    p.add_argument("--reps", type=int, default=7, help="interleaved repetitions per shape")
    p.add_argument("--only", nargs="+", choices=["prefill", "decode", "quant"], default=["prefill", "decode", "quant"])
    p.add_argument("--decode-tokens", type=int, default=64, help="tokens per quant decode run")
    p.add_argument("--quant-reps", type=int, default=3, help="interleaved rounds of the quant decode runs")
    p.add_argument("--smollm2", action="store_true", help="also the quant comparison on SmolLM2-135M-Instruct")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not native.available():
        raise SystemExit("the native kernels are unavailable (no C compiler, or EMBER_NATIVE=0)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, native kernels on "
          f"{native.threads()} threads; fp32; bench-50m attention: {HEADS} heads, {KV_HEADS} KV heads, "
          f"head_dim {HEAD_DIM}; median of {args.reps} interleaved repetitions")
    with torch.inference_mode():
        if "prefill" in args.only:
            bench_prefill(args.reps)
        if "decode" in args.only:
            bench_decode(args.reps)
    if "quant" in args.only:
        torch.manual_seed(0)
        bench_quant("bench-50m (random weights)", Transformer(preset("bench-50m")).eval(), args.quant_reps,
                    args.decode_tokens)
        if args.smollm2:
            bench_quant("SmolLM2-135M-Instruct", ember.load_model("smollm2-135m-instruct").eval(), args.quant_reps,
                        args.decode_tokens)


if __name__ == "__main__":
    main()
