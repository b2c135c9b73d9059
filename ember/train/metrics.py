"""Training telemetry: the device's measured matmul peak (for MFU), metrics.jsonl and the loss curve.

    peak = matmul_peak_flops(torch.device("cpu"), torch.float32)   # FLOP/s, measured now
    mfu = flops_per_token * tokens_per_second / peak
    log = MetricsLog(out / "metrics.jsonl"); log.write({"step": 1, "loss": 4.2})
    plot_loss_curve(out / "metrics.jsonl", out / "loss.png")

MFU is "model FLOPs utilisation" against what this device actually sustains on a large square
matmul in the same dtype (measured at start, in the same process and thread setting), not a
datasheet number: on a shared CPU the datasheet peak is meaningless.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from ember.atomic import atomic_write, atomic_write_text

log = logging.getLogger(__name__)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, size: int | None = None,
                      seconds: float = 1.0) -> float:
    """Best sustained FLOP/s of an n x n @ n x n matmul on device (best of repeated timings)."""
    n = size or (8192 if device.type == "cuda" else 2048)
    # A private generator: drawing from the global one would shift the RNG stream a resumed run
    # restored just before (and the dropout masks of every later step).
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    c = a @ b  # warm up kernels and caches
    _sync(device)
    best = float("inf")
    deadline = time.perf_counter() + seconds
    reps = 0
    while reps < 3 or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
        reps += 1
    return 2 * n**3 / best


def peak_dtype(device: torch.device, autocast_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype the model's matmuls run in: the autocast dtype, else fp32."""
    return autocast_dtype if autocast_dtype is not None else torch.float32


class MetricsLog:
    """Append-only JSON lines, one record per step or evaluation; flushed every write."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line torn by a kill mid-write
        return out

    def truncate_after(self, step: int) -> None:
        """Drop records after `step` (they belong to steps a resumed run will redo)."""
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))


def plot_loss_curve(metrics: str | Path, png: str | Path) -> Path | None:
    """Train loss per step and validation loss per evaluation, as a PNG (None without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed; skipping the loss-curve plot")
        return None
    records = MetricsLog(metrics).read()
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        ax.plot(*zip(*train), lw=1, alpha=0.8, label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", lw=1.5, ms=3, label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(Path(metrics).parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(png, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return Path(png)
