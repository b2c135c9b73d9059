"""Training throughput and MFU of the ~50M preset against the fp32 matmul peak measured in this run.

    python bench/train.py                       # bench-50m, 8 x 512 tokens per step: eager vs compiled
    python bench/train.py --steps 3 --variants eager --seq-len 256 --batch 8

Each timed step is one real `Trainer.train_step` (forward, next-token cross-entropy, backward,
clipping, fused AdamW) on synthetic token batches of the preset's vocabulary. Right before each
step the device's fp32 matmul peak is measured again (best of a few 2048^3 matmuls), so both
numbers see the same machine load; MFU = model FLOPs per token (ModelConfig.flops_per_token:
6 per matmul weight + causal attention) x tokens/s / that peak. Reported: the median over
steps, and a conservative figure against the highest peak seen in the whole run. The variants
take turns step by step, so a change in machine load hits both alike.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ember.config import preset  # noqa: E402
from ember.model.transformer import Transformer  # noqa: E402
from ember.train.loop import TrainConfig, Trainer  # noqa: E402
from ember.train.metrics import matmul_peak_flops  # noqa: E402
from ember.train.pretrain import lm_loss  # noqa: E402


class RandomTokens:
    """Synthetic (batch, seq_len + 1) blocks: throughput does not depend on token values."""

    def __init__(self, vocab: int, batch: int, seq_len: int) -> None:
        self.g = torch.Generator().manual_seed(0)
        self.shape, self.vocab = (batch, seq_len + 1), vocab

    def next_batch(self) -> torch.Tensor:
        return torch.randint(0, self.vocab, self.shape, generator=self.g)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def build_variant(name: str, args: argparse.Namespace, out: Path) -> tuple[Trainer, float]:
    """A Trainer for one variant, warmed up (compilation happens here); returns it and the warmup time."""
    cfg = preset(args.preset)
    torch.manual_seed(0)
    model = Transformer(cfg)
    tcfg = TrainConfig(out=out / name, max_steps=1000, batch_size=args.batch, micro_batch_size=args.batch,
                       compile=name == "compiled", device="cpu", progress=False, warmup_steps=10)
    trainer = Trainer(model, tcfg, lm_loss, RandomTokens(cfg.vocab_size, args.batch, args.seq_len), peak_flops=1.0)
    t0 = time.perf_counter()
    for _ in range(args.warmup):  # first steps: allocator, oneDNN kernels, compilation
        trainer.train_step()
    return trainer, time.perf_counter() - t0


def timed_step(name: str, trainer: Trainer, fpt: float) -> tuple[float, float, float]:
    """(tokens/s, MFU, peak) of one step, against the peak measured right before it."""
    peak = matmul_peak_flops(torch.device("cpu"), torch.float32, seconds=0.3)
    t = time.perf_counter()
    _, _, tokens = trainer.train_step()
    dt = time.perf_counter() - t
    mfu = fpt * tokens / dt / peak
    print(f"  {name:9} step {dt:6.2f}s  {tokens / dt:7.0f} tok/s  peak {peak / 1e9:6.1f} GFLOP/s  MFU {mfu:.1%}",
          flush=True)
    return tokens / dt, mfu, peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="bench-50m")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=8, help="sequences per step (one micro-batch)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    p.add_argument("--variants", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    args = p.parse_args()
    cfg = preset(args.preset)
    print(f"{args.preset}: {cfg.num_params() / 1e6:.1f}M parameters, {cfg.flops_per_token(args.seq_len) / 1e6:.0f} "
          f"MFLOP/token (training), batch {args.batch} x {args.seq_len} tokens, fp32")
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    fpt = cfg.flops_per_token(args.seq_len)
    with tempfile.TemporaryDirectory() as tmp:
        built = {name: build_variant(name, args, Path(tmp)) for name in args.variants}
        rows: dict[str, list[tuple[float, float, float]]] = {name: [] for name in args.variants}
        for _ in range(args.steps):  # variants take turns, so each sees the same machine load
            for name, (trainer, _) in built.items():
                rows[name].append(timed_step(name, trainer, fpt))
    results = [{"name": name, "tok_s": statistics.median(r[0] for r in rs), "mfu": statistics.median(r[1] for r in rs),
                "peaks": [r[2] for r in rs], "flops_s": statistics.median(fpt * r[0] for r in rs),
                "warmup_s": built[name][1]} for name, rs in rows.items()]
    top = max(max(r["peaks"]) for r in results)
    print(f"\nmatmul peak (fp32, 2048^3, best of each measurement): median "
          f"{statistics.median(x for r in results for x in r['peaks']) / 1e9:.1f}, max {top / 1e9:.1f} GFLOP/s")
    print(f"{'variant':10} {'tok/s':>8} {'model GFLOP/s':>14} {'MFU (median)':>13} {'MFU vs max peak':>16} {'warmup':>8}")
    for r in results:
        print(f"{r['name']:10} {r['tok_s']:8.0f} {r['flops_s'] / 1e9:14.1f} {r['mfu']:13.1%} "
              f"{r['flops_s'] / top:16.1%} {r['warmup_s']:7.0f}s")


if __name__ == "__main__":
    main()
