"""Tensor parallel against one process: the same engine, the same model and dtype, TP=2 vs TP=1.

    PYTHONPATH=. python bench/tensor_parallel.py                        # bench-50m and SmolLM2-135M
    PYTHONPATH=. python bench/tensor_parallel.py --models bench-50m --rounds 5

Both engines live in this process for the whole run (TP=2 adds one worker process, spawned by
ember, gloo on CPU / NCCL on a GPU) and are timed in alternating rounds on the same workload, so
load from other jobs falls on both alike; every process runs torch on --threads threads (default
1: TP=2 then uses two cores where TP=1 uses one). Per round: `--requests` prompts of 64-256 tokens,
`--max-tokens` output tokens each (ignore_eos), all submitted together (continuous batching), and
one batch-1 request (decode-bound). Printed per model: output tokens/s of each side (median over
rounds) and TP=2 / TP=1, rank 0's time inside the all-reduces per engine step (its share of the
step), and the weights and KV bytes per token one rank holds, which is what TP buys on a CPU:
each rank holds ~1/2 of the weights and KV heads, so a model or a context twice the size of one
process's memory fits. bench-50m: random weights (fp32); SmolLM2-135M: the GGUF's own Q4_1/Q8_0
blocks, as the engine runs it (9 query / 3 KV heads split 6+3 / 2+1: rank 0 does twice rank 1's
attention).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ember.config import preset  # noqa: E402
from ember.engine import LLM, SamplingParams  # noqa: E402
from ember.engine.config import weight_bytes  # noqa: E402
from ember.model.transformer import Transformer  # noqa: E402


def load(name: str) -> Transformer:
    if name == "bench-50m":
        torch.manual_seed(0)
        return Transformer(preset("bench-50m")).eval()
    from ember.checkpoint.hf import load_model

    return load_model(name, keep_quantized=True)


def workload(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randrange(64, 257))] for _ in range(n)]


class Timed:
    """An LLM whose runner counts engine steps and their seconds."""

    def __init__(self, llm: LLM) -> None:
        self.llm = llm
        self.steps, self.step_s = 0, 0.0
        runner = llm.engine.runner
        run = runner.run

        def timed(step):
            t = time.perf_counter()
            out = run(step)
            self.step_s += time.perf_counter() - t
            self.steps += 1
            return out

        runner.run = timed

    def tokens_per_s(self, prompts: list[list[int]], max_tokens: int) -> float:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        t = time.perf_counter()
        outs = self.llm.generate(prompts, params)
        return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t)


def bench(name: str, args: argparse.Namespace) -> None:
    model = load(name)
    kv = dict(kv_cache_memory=0.5, max_num_seqs=max(args.requests, 1))
    full_bytes = weight_bytes(model)
    one = Timed(LLM(load(name), **kv))
    two = Timed(LLM(model, tensor_parallel_size=2, **kv))
    group = two.llm.engine.runner.group
    vocab = model.config.vocab_size
    batch, single = workload(args.requests, vocab), workload(1, vocab, seed=1)
    for side in (one, two):  # warm-up: kernels built, heaps grown
        side.tokens_per_s(batch[:2], 4)
    rates: dict[str, list[float]] = {"1 batch": [], "2 batch": [], "1 single": [], "2 single": []}
    comm0, steps0, step_s0 = group.comm.seconds, two.steps, two.step_s
    for r in range(args.rounds):
        order = (("1", one), ("2", two)) if r % 2 == 0 else (("2", two), ("1", one))
        for key, side in order:
            rates[f"{key} batch"].append(side.tokens_per_s(batch, args.max_tokens))
            rates[f"{key} single"].append(side.tokens_per_s(single, args.max_tokens))
    steps, step_s, comm = two.steps - steps0, two.step_s - step_s0, group.comm.seconds - comm0
    med = {k: statistics.median(v) for k, v in rates.items()}
    cfg = model.config  # rank 0's shard now
    print(f"\n{name}: {args.requests} requests x {args.max_tokens} tokens (and one batch-1 request), "
          f"{args.rounds} alternating rounds, {args.threads} thread(s) per process, "
          f"{'NCCL' if next(model.parameters()).is_cuda else 'gloo'}")
    for kind in ("batch", "single"):
        print(f"  {kind:6s}  TP=1 {med['1 ' + kind]:8.1f} tok/s   TP=2 {med['2 ' + kind]:8.1f} tok/s   "
              f"TP=2 / TP=1 = {med['2 ' + kind] / med['1 ' + kind]:.2f}")
    print(f"  TP=2 rank 0 in the all-reduces after o_proj / down_proj: {1000 * comm / max(steps, 1):.2f} ms per step "
          f"({comm / max(step_s, 1e-9):.0%} of step time, {steps} steps)")
    kv_full = one.llm.engine.model.config.kv_bytes_per_token(4)
    print(f"  per rank: weights {weight_bytes(model) / 2**20:.1f} of {full_bytes / 2**20:.1f} MiB, "
          f"KV {cfg.kv_bytes_per_token(4)} of {kv_full} bytes per token (fp32)")
    two.llm.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["bench-50m", "smollm2-135m-instruct"])
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("ember TP=2 (2 processes, Megatron splits, all-reduce per o_proj / down_proj) against ember TP=1 "
          "(one process), same engine settings, model and dtype, timed in alternating rounds")
    for name in args.models:
        bench(name, args)


if __name__ == "__main__":
    main()
