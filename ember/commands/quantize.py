"""Quantize a model (INT8, NF4, RTN, GPTQ, AWQ), save it in the Hugging Face layout, and compare it
with the unquantized model on held-out perplexity, size and batch-1 decode speed.

    ember quantize --model runs/quickstart/base --method gptq --bits 4 --group-size 128 --out runs/q/gptq
    ember quantize --model DIR --method nf4 --out DIR-nf4
    ember quantize --model DIR --method awq --calib-data notes/ --eval-data held_out.txt --out DIR-awq

The saved folder loads with `ember.load_model` (and the tokenizer is copied alongside). GPTQ and
AWQ calibrate on `--calib-samples` windows of `--calib-seq-len` tokens drawn from the bundled
corpus's training documents (or your files); perplexity is measured on its held-out documents.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from ember.checkpoint.hf import load_model, save_model
from ember.checkpoint.registry import MODEL_HELP
from ember.quant.calibration import calibration_ids
from ember.quant.quantize import CALIBRATED, QuantConfig, quantize_model
from ember.quant.report import QuantRow, format_table, heldout_texts, measure
from ember.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


@dataclass
class QuantizeConfig:
    """Quantize a model folder and print its size / perplexity / speed against the original."""

    model: Path = field(metadata={"help": MODEL_HELP})
    out: Path = field(metadata={"help": "folder for the quantized model"})
    method: Literal["int8", "nf4", "rtn", "gptq", "awq"] = field(default="int8", metadata={"help": "scheme"})
    bits: int = field(default=4, metadata={"help": "rtn/gptq/awq: bits per weight (2, 3, 4, 8)"})
    group_size: int = field(default=128, metadata={"help": "rtn/gptq/awq: input columns per scale (-1: whole row)"})
    sym: bool = field(default=False, metadata={"help": "rtn/gptq: symmetric grid"})
    act_order: bool = field(default=False, metadata={"help": "gptq: quantize columns by decreasing Hessian diagonal"})
    double_quant: bool = field(default=True, metadata={"help": "nf4: quantize the absmax constants too"})
    awq_clip: bool = field(default=True, metadata={"help": "awq: search a clipping range per group"})
    calib_data: list[str] = field(default_factory=lambda: ["bundled"],
                                  metadata={"help": "calibration text: 'bundled' and/or files and folders"})
    calib_samples: int = field(default=128, metadata={"help": "calibration windows"})
    calib_seq_len: int = field(default=512, metadata={"help": "tokens per calibration window"})
    eval_data: list[str] = field(default_factory=lambda: ["bundled"],
                                 metadata={"help": "held-out text for perplexity ('bundled' = its held-out split)"})
    eval_tokens: int = field(default=50_000, metadata={"help": "held-out tokens to score (about)"})
    eval_seq_len: int = field(default=512, metadata={"help": "perplexity window length"})
    decode_tokens: int = field(default=64, metadata={"help": "tokens to time batch-1 decode over (0: skip)"})
    baseline: bool = field(default=True, metadata={"help": "also measure the unquantized model"})
    seed: int = field(default=0, metadata={"help": "calibration sampling seed"})


CONFIG = QuantizeConfig


def quant_config(cfg: QuantizeConfig) -> QuantConfig:
    return QuantConfig(method=cfg.method, bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym,
                       act_order=cfg.act_order, double_quant=cfg.double_quant, awq_clip=cfg.awq_clip)


def run(cfg: QuantizeConfig) -> tuple[QuantRow | None, QuantRow]:
    """Quantize, save and measure; returns (baseline row or None, quantized row)."""
    qcfg = quant_config(cfg)
    qcfg.validate()
    tok = load_tokenizer(cfg.model)
    model = load_model(cfg.model, dtype="float32")
    max_len = min(cfg.eval_seq_len, model.config.max_position_embeddings)
    texts = heldout_texts(tok, cfg.eval_data, cfg.eval_tokens)
    base = measure(model, tok, texts, "fp32", max_len, cfg.decode_tokens) if cfg.baseline else None
    calib = None
    if qcfg.method in CALIBRATED:
        seq_len = min(cfg.calib_seq_len, model.config.max_position_embeddings)
        calib = calibration_ids(tok, cfg.calib_data, cfg.calib_samples, seq_len, cfg.seed)
    quantize_model(model, qcfg, calib)
    save_model(model, cfg.out)
    tok.save(cfg.out)
    label = cfg.method if cfg.method in ("int8", "nf4") else f"{cfg.method}-{cfg.bits}b-g{cfg.group_size}"
    row = measure(model, tok, texts, label, max_len, cfg.decode_tokens, base)
    return base, row


def main(cfg: QuantizeConfig) -> None:
    base, row = run(cfg)
    print(format_table([r for r in (base, row) if r is not None]))
    print(f"saved to {cfg.out}")


def stage_quantize(state) -> None:
    """Quickstart stage: GPTQ 4-bit of the latest model, measured against it."""
    fast = state.cfg.fast
    out = state.cfg.out / "quantized-gptq"
    cfg = QuantizeConfig(model=state.model_dir, out=out, method="gptq", bits=4,
                         group_size=32 if fast else 128, calib_samples=4 if fast else 32,
                         calib_seq_len=64 if fast else 256, eval_tokens=2_000 if fast else 20_000,
                         eval_seq_len=128 if fast else 512, decode_tokens=8 if fast else 32)
    base, row = run(cfg)
    print(format_table([base, row]))
    state.perplexity["quantized-gptq"] = row.perplexity
    state.quantized_dir = out
    torch.manual_seed(state.cfg.seed)
