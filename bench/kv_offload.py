"""KV offload: time to first token of a returning long prompt, restored from the offload tier vs recomputed.

    PYTHONPATH=. python bench/kv_offload.py                  # SmolLM2-135M (Q4_1 GGUF), 2,048-token prompts
    PYTHONPATH=. python bench/kv_offload.py --rounds 5 --kv-cache-dtype float16 --threads 2

Two engines on the same model file (each its own copy of the weights), the same EngineConfig
(block_size 16, a pool of --pool-tokens, prefix caching and chunked prefill on, the same torch
threads), one with a KV offload tier of --offload-gb (an mmap'd file in a temporary directory),
one without. Each round, both engines in turn (the order alternating between rounds) serve:

  1. prompt A (--prompt-tokens tokens of Python documentation text), untimed;
  2. --traffic other prompts of the same length, untimed: they evict every one of A's blocks
     from the small pool (checked: the script stops if any is still there);
  3. A again, timed from add_request to its first token (TTFT), then greedily to --max-tokens.
     Offload engine: A's blocks come back from the tier (a copy), only the last block's tokens
     are computed. Baseline: A's whole prompt is computed again (a prefill).

Each round uses new prompts, so the tier never holds A before its first visit. A's returning
output must be identical on both engines and to its first visit (checked). Printed: each round's
TTFTs, the median of each side, and their ratio (recompute / offload: above 1 is faster with the
tier). Timings on a shared machine vary; the ratio is taken within one run, interleaved.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ember.engine import LLM, SamplingParams  # noqa: E402
from ember.engine.engine import LLMEngine  # noqa: E402
from ember.engine.kv_cache import hash_block  # noqa: E402


def text_prompts(llm: LLM, n: int, length: int) -> list[list[int]]:
    """n prompts of `length` tokens each, from disjoint stretches of the pydoc topics."""
    from pydoc_data.topics import topics

    ids = llm.get_tokenizer().encode("\n\n".join(topics[k] for k in sorted(topics)))
    if len(ids) < n * length:
        raise SystemExit(f"the pydoc text has {len(ids)} tokens, fewer than {n} x {length}: lower --rounds or --traffic")
    return [ids[i * length:(i + 1) * length] for i in range(n)]


def serve(engine: LLMEngine, rid: str, ids: list[int], max_tokens: int) -> tuple[float, list[int]]:
    """Run one request alone: (seconds to its first token, its tokens)."""
    t0 = time.perf_counter()
    engine.add_request(rid, ids, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), stream=True)
    ttft, tokens = None, []
    while engine.has_unfinished():
        for out in engine.step():
            new = out.outputs[0].token_ids if out.outputs else []
            if new and ttft is None:
                ttft = time.perf_counter() - t0
            tokens += new
    return ttft, tokens


def blocks_in_pool(engine: LLMEngine, ids: list[int]) -> int:
    """How many of the prompt's leading full blocks the pool's prefix cache still holds."""
    bs, hashes = engine.kv.block_size, []
    for i in range((len(ids) - 1) // bs):
        hashes.append(hash_block(hashes[-1] if hashes else b"", ids[i * bs:(i + 1) * bs]))
    return sum(h in engine.kv.cached for h in hashes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model folder, GGUF or known name")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, both engines (1 is steadier on shared cores)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=2048)
    ap.add_argument("--traffic", type=int, default=2, help="other prompts served between A's two visits")
    ap.add_argument("--pool-tokens", type=int, default=2560, help="KV pool of each engine, in tokens")
    ap.add_argument("--offload-gb", type=float, default=1.0)
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens generated for each request")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    common = dict(block_size=16, num_kv_blocks=args.pool_tokens // 16, kv_cache_dtype=args.kv_cache_dtype,
                  max_num_batched_tokens=max(2048, args.prompt_tokens))
    sides = {"offload": LLM(args.model, kv_offload_gb=args.offload_gb, **common), "recompute": LLM(args.model, **common)}
    engines = {name: llm.engine for name, llm in sides.items()}
    prompts = text_prompts(sides["offload"], args.rounds * (1 + args.traffic), args.prompt_tokens)
    print(f"model {args.model}, {args.threads} torch threads, KV cache {args.kv_cache_dtype}, "
          f"pool {args.pool_tokens} tokens each, prompts of {args.prompt_tokens} tokens, {args.traffic} other "
          f"prompts between A's visits; offload tier {args.offload_gb} GiB ({engines['offload'].kv.offload.where})")
    ttfts: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(args.rounds):
        group = prompts[r * (1 + args.traffic):(r + 1) * (1 + args.traffic)]
        a, traffic = group[0], group[1:]
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        outputs = {}
        for name in order:
            engine = engines[name]
            _, first = serve(engine, f"{r}-a", a, args.max_tokens)
            for i, other in enumerate(traffic):
                serve(engine, f"{r}-t{i}", other, args.max_tokens)
            left = blocks_in_pool(engine, a)
            if left:
                raise SystemExit(f"{name}: {left} of A's blocks are still in the pool: raise --traffic or lower "
                                 "--pool-tokens, or the comparison is not of an evicted prompt")
            ttft, again = serve(engine, f"{r}-a-again", a, args.max_tokens)
            if again != first:
                raise SystemExit(f"{name}: A's returning output differs from its first visit")
            outputs[name] = again
            ttfts[name].append(ttft)
        if outputs["offload"] != outputs["recompute"]:
            raise SystemExit("the offload and recompute engines gave A different outputs")
        print(f"round {r + 1}: TTFT of the returning prompt: offload {ttfts['offload'][-1] * 1e3:.1f} ms, "
              f"recompute {ttfts['recompute'][-1] * 1e3:.1f} ms ({order[0]} first); outputs identical")
    off, rec = statistics.median(ttfts["offload"]), statistics.median(ttfts["recompute"])
    stats = engines["offload"].stats().kv_offload
    print(f"tier: {stats.stored_prefix_blocks} blocks stored, {stats.restored_prefix_blocks} restored, "
          f"{stats.dropped_blocks} dropped (LRU)")
    print(f"median TTFT of a returning {args.prompt_tokens}-token prompt: offload {off * 1e3:.1f} ms "
          f"(restored from the tier), recompute {rec * 1e3:.1f} ms (prefilled again): "
          f"{rec / off:.1f}x lower with the offload tier")


if __name__ == "__main__":
    main()
