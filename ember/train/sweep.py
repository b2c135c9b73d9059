"""Scaling sweep: train a grid of small (model size, token budget) runs and record final losses.

    ember scaling sweep --tokenizer runs/tok --models 2x64 4x128 --tokens 2e5 1e6 --out runs/scaling
    ember scaling fit --data runs/scaling/results.csv --plot runs/scaling/fit.png

Each model is LAYERSxWIDTH (SwiGLU width ~8/3, heads of 64, tied embeddings) trained from
scratch for the given number of tokens with `ember pretrain`'s code path and a cosine schedule
sized to that budget, on one shared set of token shards. `results.csv` gets one row per run as
soon as it finishes (params = non-embedding parameters, as Kaplan et al. count for small models;
params_total includes the embedding; flops = 6 * params * tokens; loss = final validation
loss), so an interrupted sweep resumes by rerunning the same command.
"""

from __future__ import annotations

import csv
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ember.config import ModelConfig
from ember.model.transformer import Transformer
from ember.tokenizer import load_tokenizer
from ember.train.metrics import matmul_peak_flops
from ember.train.pretrain import PretrainConfig, pretrain
from ember.train.scaling import ScalingError

log = logging.getLogger(__name__)

COLUMNS = ("model", "layers", "width", "params", "params_total", "tokens", "flops", "loss", "train_loss", "steps")


@dataclass
class SweepConfig:
    """Train a grid of small models on several token budgets and record their final losses."""

    tokenizer: Path = field(metadata={"help": "tokenizer folder (train one with `ember tokenizer train`)"})
    out: Path = field(default=Path("runs/scaling"), metadata={"help": "folder for runs/, data/ and results.csv"})
    models: list[str] = field(default_factory=lambda: ["2x64", "3x96", "4x128"], metadata={
        "help": "model shapes LAYERSxWIDTH"})
    tokens: list[float] = field(default_factory=lambda: [1e5, 3e5, 1e6], metadata={"help": "token budgets"})
    data: list[str] = field(default_factory=lambda: ["bundled"], metadata={"help": "mixture items PATHS[@WEIGHT]"})
    seq_len: int = field(default=128, metadata={"help": "tokens per sequence"})
    batch_size: int = field(default=16, metadata={"help": "sequences per step"})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})


def shape(spec: str, vocab_size: int, seq_len: int) -> ModelConfig:
    m = re.fullmatch(r"(\d+)x(\d+)", spec.strip())
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 16:
        raise ScalingError(f"model shape {spec!r} is not LAYERSxWIDTH (e.g. 4x128, width >= 16)")
    layers, width = int(m.group(1)), int(m.group(2))
    heads = max(1, width // 64)
    if width % heads or (width // heads) % 2:
        raise ScalingError(f"model shape {spec!r}: width must split into even-sized heads of ~64")
    ff = 32 * math.ceil(width * 8 / 3 / 32)
    return ModelConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=ff, num_layers=layers,
                       num_heads=heads, max_position_embeddings=seq_len, tie_word_embeddings=True)


def _done(results: Path) -> set[tuple[str, int]]:
    if not results.exists():
        return set()
    with results.open(newline="") as f:
        return {(r["model"], int(float(r["tokens"]))) for r in csv.DictReader(f)}


def sweep(cfg: SweepConfig) -> Path:
    """Run every (model, tokens) pair not yet in <out>/results.csv; returns the CSV path."""
    tok = load_tokenizer(cfg.tokenizer)
    shapes = {m: shape(m, tok.vocab_size, cfg.seq_len) for m in cfg.models}  # validate all first
    per_step = cfg.batch_size * cfg.seq_len
    results = cfg.out / "results.csv"
    cfg.out.mkdir(parents=True, exist_ok=True)
    peak = matmul_peak_flops(torch.device("cpu"))  # once for all runs (MFU in each run's metrics)
    for name, mcfg in shapes.items():
        for budget in cfg.tokens:
            steps = max(1, round(budget / per_step))
            tokens = steps * per_step
            if (name, tokens) in _done(results):
                continue
            run = PretrainConfig(out=cfg.out / "runs" / f"{name}-{tokens}", tokenizer=cfg.tokenizer,
                                 data=list(cfg.data), data_dir=cfg.out / "data", seq_len=cfg.seq_len,
                                 batch_size=cfg.batch_size, micro_batch_size=cfg.batch_size, max_steps=steps,
                                 warmup_steps=max(1, steps // 10), lr=cfg.lr, eval_every=0, save_every=0,
                                 keep_last=1, seed=cfg.seed, progress=cfg.progress, device="cpu")
            torch.manual_seed(cfg.seed)
            result = pretrain(run, model=Transformer(mcfg), peak_flops=peak)
            n = mcfg.num_params(non_embedding=True)
            row = {"model": name, "layers": mcfg.num_layers, "width": mcfg.hidden_size, "params": n,
                   "params_total": mcfg.num_params(), "tokens": tokens, "flops": 6 * n * tokens,
                   "loss": result.val_after["val_loss"], "train_loss": result.train.loss, "steps": steps}
            new = not results.exists()
            with results.open("a", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=COLUMNS)
                if new:
                    writer.writeheader()
                writer.writerow(row)
            print(f"{name} ({n / 1e6:.2f}M non-embedding params) on {tokens:.3g} tokens: "
                  f"val loss {row['loss']:.4f}", flush=True)
    return results
