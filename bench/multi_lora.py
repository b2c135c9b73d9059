"""Multi-LoRA serving throughput: many adapters in one engine, against the base alone and against
serving one adapter at a time, measured in the same process, interleaved.

    PYTHONPATH=. python bench/multi_lora.py --threads 1          # ~8 min on a quiet core
    PYTHONPATH=. python bench/multi_lora.py --rank 8 --targets q_proj v_proj --rounds 1

Model: bench-50m (random weights, fp32). Adapters: 8 random LoRA adapters (PEFT format, written by
ember's save_adapter), rank --rank on --targets (default 16 on every linear layer of the blocks:
the heavy case). Workload: --requests (64) requests, prompts of 128 random token ids (no shared
prefix), --max-tokens (128) output tokens each (ignore_eos), greedy; all submitted at once.

Each round runs, in this order, with the same threads:
  base            LLM(model): a plain engine (native fused decode layers), every request on the base
                  model. The denominator of the target (multi-LoRA >= 70 % of its tokens/s).
  multi-LoRA      LLM(model copy, enable_lora, max_loras=8, max_lora_rank=rank): the requests spread
                  round-robin over the 8 adapters, all in the same batches (one base matmul per layer
                  for every row, then each adapter's rows' low-rank update).
  one-at-a-time   the base engine serving each adapter's share alone, in turn: the adapter merged
                  into the weights in place (W += scaling * B @ A), its requests served, unmerged.
                  Merging is timed apart and not counted in its tokens/s (a favour to this side).
  base on LoRA    the multi-LoRA engine given the requests with no adapter: what enabling LoRA
                  costs a step that uses none (its layers run as modules, not the fused native layer).
Tokens/s are output tokens over wall-clock time of LLM.generate, and over this process's CPU time
(time.process_time: other jobs on a shared machine disturb it much less); medians over --rounds;
ratios against base within each round. Compare ratios, not absolute numbers.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ember.adapters.lora import LoRAConfig, apply_lora, lora_layers, lora_scaling  # noqa: E402
from ember.checkpoint.peft import read_adapter, save_adapter  # noqa: E402
from ember.config import preset  # noqa: E402
from ember.engine import LLM, LoRARequest, SamplingParams  # noqa: E402
from ember.model.transformer import Transformer  # noqa: E402

NUM_ADAPTERS = 8


def make_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(preset("bench-50m")).eval()


def make_adapters(folder: Path, rank: int, targets: list[str]) -> list[Path]:
    model = make_model()
    apply_lora(model, LoRAConfig(r=rank, alpha=2 * rank, targets=targets[0] if targets == ["all-linear"]
                                 else tuple(targets)))
    paths = []
    for i in range(NUM_ADAPTERS):
        torch.manual_seed(1000 + i)
        with torch.no_grad():
            for _, layer in lora_layers(model):
                layer.lora_A.weight.normal_(0, 0.02)
                layer.lora_B.weight.normal_(0, 0.02)
        paths.append(save_adapter(model, folder / f"adapter{i}"))
    return paths


class Merged:
    """One adapter folded into a served model's weights in place, and taken out again."""

    def __init__(self, model: Transformer, path: Path) -> None:
        tensors, _, rslora = read_adapter(model, path)
        self.deltas = [(model.get_submodule(name).weight, (t.b @ t.a) * lora_scaling(t.alpha, t.r, rslora))
                       for name, t in tensors.items()]

    def apply(self, sign: float) -> None:
        with torch.no_grad():
            for w, delta in self.deltas:
                w.add_(delta, alpha=sign)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", nargs="+", default=["all-linear"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = random.Random(0)
    vocab = preset("bench-50m").vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(args.prompt_len)] for _ in range(args.requests)]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    tokens = args.requests * args.max_tokens
    engine_opts = {"max_num_seqs": args.requests, "kv_cache_memory": 1.0}

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_adapters(Path(tmp), args.rank, args.targets)
        base = LLM(make_model(), **engine_opts)
        multi = LLM(make_model(), enable_lora=True, max_loras=NUM_ADAPTERS, max_lora_rank=args.rank, **engine_opts)
        loras = [LoRARequest(f"adapter{i}", i + 1, str(p)) for i, p in enumerate(paths)]
        which = [loras[i % NUM_ADAPTERS] for i in range(args.requests)]
        merged = [Merged(base.engine.model, p) for p in paths]
        # Untimed warm-up: adapters into host memory and slots, kernels built, heaps grown.
        multi.generate(prompts[:NUM_ADAPTERS], SamplingParams(temperature=0, max_tokens=4), which[:NUM_ADAPTERS])
        base.generate(prompts[:NUM_ADAPTERS], SamplingParams(temperature=0, max_tokens=4))

        def timed(fn) -> tuple[float, float]:
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            return time.perf_counter() - t0, time.process_time() - c0

        def one_at_a_time() -> tuple[tuple[float, float], float]:
            wall = cpu = merge = 0.0
            for k in range(NUM_ADAPTERS):
                idx = [i for i in range(args.requests) if i % NUM_ADAPTERS == k]
                share = [prompts[i] for i in idx]
                merge += timed(lambda m=merged[k]: m.apply(1.0))[0]
                w, c = timed(lambda share=share: base.generate(share, params))
                wall, cpu = wall + w, cpu + c
                merge += timed(lambda m=merged[k]: m.apply(-1.0))[0]
            return (wall, cpu), merge

        names = ("base", "multi-LoRA", "one-at-a-time", "base on LoRA")
        rows: dict[str, list[float]] = {k: [] for k in names}  # tokens per wall-clock second
        cpu_rows: dict[str, list[float]] = {k: [] for k in names}  # tokens per CPU-second of this process
        merge_times = []
        for r in range(args.rounds):
            t_base = timed(lambda: base.generate(prompts, params))
            t_multi = timed(lambda: multi.generate(prompts, params, which))
            t_one, t_merge = one_at_a_time()
            t_plain = timed(lambda: multi.generate(prompts, params))
            for name, (wall, cpu) in zip(names, (t_base, t_multi, t_one, t_plain)):
                rows[name].append(tokens / wall)
                cpu_rows[name].append(tokens / cpu)
            merge_times.append(t_merge)
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} tok/s" for k, v in rows.items())
                  + f"; multi-LoRA / base {rows['multi-LoRA'][-1] / rows['base'][-1]:.2f}x wall-clock, "
                  f"{cpu_rows['multi-LoRA'][-1] / cpu_rows['base'][-1]:.2f}x per CPU-second", flush=True)

    print(f"\nbench-50m fp32, {args.threads} thread(s), {args.requests} requests x {args.prompt_len} prompt + "
          f"{args.max_tokens} output tokens, {NUM_ADAPTERS} adapters rank {args.rank} on {' '.join(args.targets)}; "
          f"medians of {args.rounds} interleaved rounds")
    med = {k: statistics.median(v) for k, v in rows.items()}
    ratios = {k: statistics.median(x / b for x, b in zip(v, rows["base"])) for k, v in rows.items()}
    cpu_ratios = {k: statistics.median(x / b for x, b in zip(v, cpu_rows["base"])) for k, v in cpu_rows.items()}
    for name, what in (("base", "plain engine, no adapters (fused native decode)"),
                       ("multi-LoRA", f"{NUM_ADAPTERS} adapters mixed in the same batches"),
                       ("one-at-a-time", "base engine, each adapter merged in turn, its share served alone"),
                       ("base on LoRA", "LoRA-enabled engine, requests without adapters")):
        print(f"  {name:14s} {med[name]:7.1f} tok/s   {ratios[name]:.2f}x base   "
              f"({cpu_ratios[name]:.2f}x per CPU-second)   ({what})")
    vs_one = statistics.median(m / o for m, o in zip(rows["multi-LoRA"], rows["one-at-a-time"]))
    print(f"  multi-LoRA / one-at-a-time: {vs_one:.2f}x"
          f"; merging + unmerging 8 adapters took {statistics.median(merge_times):.2f} s per round (not counted)")
    print(f"  target: multi-LoRA >= 0.70x base -> wall-clock {'met' if ratios['multi-LoRA'] >= 0.70 else 'NOT met'}, "
          f"per CPU-second {'met' if cpu_ratios['multi-LoRA'] >= 0.70 else 'NOT met'}")


if __name__ == "__main__":
    main()
