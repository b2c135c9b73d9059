"""Tiny pretraining runs for the training tests: config, its command line, and reading results back."""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import load_file

from ember.train.pretrain import PretrainConfig

PEAK = 1e10  # skip measuring the matmul peak in-process: MFU is not under test here
# CLI runs in subprocesses: one intra-op thread (see conftest._one_thread).
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def tiny_config(textdata: dict[str, Path], out: Path, **overrides) -> PretrainConfig:
    """A few-second pretraining run of the `tiny` preset on the small corpus."""
    values = dict(out=out, model="tiny", tokenizer=textdata["tok"],
                  data=[f"{textdata['prose']}@0.7", f"{textdata['code']}@0.3"], data_dir=textdata["data"],
                  seq_len=32, batch_size=4, micro_batch_size=2, max_steps=8, warmup_steps=2, lr=3e-3,
                  eval_every=4, save_every=3, val_sequences=4, val_fraction=0.1, progress=False)
    values.update(overrides)
    return PretrainConfig(**values)


def cli_args(cfg: PretrainConfig) -> list[str]:
    """`ember pretrain` flags for the fields tiny_config sets."""
    args = ["pretrain"]
    for key in ("out", "model", "tokenizer", "data_dir", "seq_len", "batch_size", "micro_batch_size", "max_steps",
                "warmup_steps", "lr", "eval_every", "save_every", "val_sequences", "val_fraction", "parallel"):
        args += ["--" + key.replace("_", "-"), str(getattr(cfg, key))]
    return args + ["--data", *cfg.data, "--no-progress"]


def losses(out: Path) -> dict:
    """step -> (train loss, grad norm, lr) and ('val', step) -> val loss; the last record of a step wins."""
    table: dict = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            table[r["step"]] = (r["loss"], r["grad_norm"], r["lr"])
        if "val_loss" in r:
            table[("val", r["step"])] = r["val_loss"]
    return table


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)
