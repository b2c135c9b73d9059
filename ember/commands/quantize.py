"""Quantize a model (INT8, NF4, RTN, GPTQ, AWQ), save it in the Hugging Face layout, and compare it
with the unquantized model on held-out perplexity, size and batch-1 decode speed.

    ember quantize --model runs/quickstart/base --method gptq --bits 4 --group-size 128 --out runs/q/gptq
    ember quantize --model DIR --method nf4 --out DIR-nf4
    ember quantize --model DIR --method awq --calib-data notes/ --eval-data held_out.txt --out DIR-awq

The saved folder loads with `ember.load_model` (and the tokenizer is copied alongside). GPTQ and
AWQ calibrate on `--calib-samples` windows of `--calib-seq-len` tokens drawn from the bundled
corpus's training documents (or your files); perplexity is measured on text the bundled corpus
never trains on (its held-out documents, ~15k tokens, then standard-library code past its code
cap), with a bootstrap standard error over the scoring windows beside each perplexity and change.
`--eval-tokens` (default 100k) asks for about that many held-out tokens; where the held-out text
holds fewer (e.g. your own small file), all of it is scored and a note says so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from ember.checkpoint.hf import load_model, save_model
from ember.checkpoint.registry import MODEL_HELP
from ember.eval.report import HeldOutRow
from ember.quant.calibration import calibration_ids
from ember.quant.linear import quantizable_linears
from ember.quant.quantize import CALIBRATED, QuantConfig, quantize_model
from ember.quant.report import (
    QuantRow,
    clamp_note,
    format_table,
    heldout_line,
    heldout_set,
    measure,
)
from ember.quant.rtn import rtn_quantize
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
    eval_tokens: int = field(default=100_000, metadata={
        "help": "held-out tokens to score (about); clamped, with a note, to what the held-out text holds"})
    eval_seq_len: int = field(default=512, metadata={"help": "perplexity window length"})
    decode_tokens: int = field(default=64, metadata={"help": "tokens to time batch-1 decode over (0: skip)"})
    baseline: bool = field(default=True, metadata={"help": "also measure the unquantized model"})
    seed: int = field(default=0, metadata={"help": "calibration sampling seed"})
    quantize_head: bool = field(default=False, metadata={
        "help": "also keep the embedding and LM head in 8 bits (Q8_0) in memory; the checkpoint stores them "
                "in floating point, as Hugging Face formats do, and ember quantizes them again on load"})


CONFIG = QuantizeConfig


def quant_config(cfg: QuantizeConfig) -> QuantConfig:
    return QuantConfig(method=cfg.method, bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym,
                       act_order=cfg.act_order, double_quant=cfg.double_quant, awq_clip=cfg.awq_clip,
                       quantize_head=cfg.quantize_head)


def run(cfg: QuantizeConfig) -> tuple[QuantRow | None, QuantRow]:
    """Quantize, save and measure; returns (baseline row or None, quantized row)."""
    qcfg = quant_config(cfg)
    qcfg.validate()
    tok = load_tokenizer(cfg.model)
    model = load_model(cfg.model, dtype="float32")
    max_len = min(cfg.eval_seq_len, model.config.max_position_embeddings)
    texts = heldout_set(tok, cfg.eval_data, cfg.eval_tokens).texts
    base = measure(model, tok, texts, "fp32", max_len, cfg.decode_tokens) if cfg.baseline else None
    calib = None
    if qcfg.method in CALIBRATED:
        seq_len = min(cfg.calib_seq_len, model.config.max_position_embeddings)
        calib = calibration_ids(tok, cfg.calib_data, cfg.calib_samples, seq_len, cfg.seed)
    quantize_model(model, qcfg, calib)
    save_model(model, cfg.out)
    tok.save(cfg.out)
    label = cfg.method if cfg.method in ("int8", "nf4") else f"{cfg.method}-{cfg.bits}b-g{cfg.group_size}"
    if cfg.quantize_head:
        label += "+q8head"
    row = measure(model, tok, texts, label, max_len, cfg.decode_tokens, base)
    return base, row


def main(cfg: QuantizeConfig) -> None:
    base, row = run(cfg)
    rows = [r for r in (base, row) if r is not None]
    if row.heldout is not None:  # the clamp: fewer tokens scored than asked for
        note = clamp_note(cfg.eval_data, cfg.eval_tokens, row.heldout.tokens, row.heldout.documents)
        if note is not None:
            print(note)
    print(format_table(rows))
    print(heldout_line(rows))
    print(f"saved to {cfg.out}")


def stage_quantize(state) -> None:
    """Quickstart stage: GPTQ 4-bit of the latest model, measured against it on the run's held-out set."""
    fast = state.cfg.fast
    out = state.cfg.out / "quantized-gptq"
    cfg = QuantizeConfig(model=state.model_dir, out=out, method="gptq", bits=4,
                         group_size=32 if fast else 128, calib_samples=4 if fast else 32,
                         calib_seq_len=64 if fast else 256,
                         eval_data=[str(state.heldout.write(state.cfg.out / "heldout.jsonl"))],
                         eval_tokens=2**62, eval_seq_len=state.heldout.window, decode_tokens=8 if fast else 32)
    base, row = run(cfg)
    print(format_table([base, row]))
    state.perplexity["quantized-gptq"] = HeldOutRow(state.perplexity[state.model_label].tokenizer, row.heldout)
    state.quantized_dir = out
    torch.manual_seed(state.cfg.seed)


def grid_error(model: torch.nn.Module, group_size: int) -> float:
    """Relative weight error ||W - RTN4(W)|| / ||W|| over the quantizable layers at one group size."""
    err = norm = 0.0
    for linear in quantizable_linears(model).values():
        w = linear.weight.detach().float()
        err += float((w - rtn_quantize(w, 4, group_size).dequantize()).square().sum())
        norm += float(w.square().sum())
    return (err / norm) ** 0.5


def stage_real_quantize(state) -> None:
    """Quickstart stage: RTN, GPTQ and AWQ 4-bit of the real model against its fp32 weights.

    Every row is measured on the run's held-out set and window (so they join the final table);
    calibration draws from the bundled corpus's training documents. Quantized copies are measured
    in memory, not saved (`ember quantize --model smollm2-135m-instruct` saves one).
    """
    real = state.real_model()
    if real is None:
        return
    fast = state.cfg.fast
    # 64 columns per group: 576 (the hidden size) is no multiple of 128, and at 32 RTN would simply
    # find the GGUF's own Q4_1 blocks again (see the note printed below).
    group = 64
    texts, window = list(state.heldout.texts), state.heldout.window
    base = measure(real.model, real.tokenizer, texts, "fp32", window, decode_tokens=0)
    rows = [base]
    # Small calibration: AWQ's scale search reruns every block's layers once per grid point over it,
    # the costliest part of the stage on two cores.
    calib = calibration_ids(real.tokenizer, ["bundled"], 2 if fast else 8, 64 if fast else 128, state.cfg.seed)
    # --fast: RTN only; GPTQ's and AWQ's passes over 30 layers take minutes on two cores.
    methods = ("rtn",) if fast else ("rtn", "gptq", "awq")
    if fast:
        print("  --fast: RTN only (GPTQ and AWQ calibrate every one of the layers: minutes; the full run has them)")
    for method in methods:
        # a fresh load, not a copy: the engine stages attached native-kernel state to the shared model
        model = load_model(real.file)
        quantize_model(model, QuantConfig(method=method, bits=4, group_size=group),
                       calib if method in CALIBRATED else None)
        rows.append(measure(model, real.tokenizer, texts, f"{method}-4b-g{group}", window, 0, base))
        del model
    print(format_table(rows))
    family = "SmolLM2" if real.name == "smollm2-135m-instruct" else real.name
    tokenizer = f"{family} {real.tokenizer.vocab_size}"
    state.perplexity[f"{real.name} fp32"] = HeldOutRow(tokenizer, base.heldout)
    for row in rows[1:]:
        state.perplexity[f"{real.name} {row.label}"] = HeldOutRow(tokenizer, row.heldout)
    print(f"  {state.heldout.describe()}; calibration {calib.shape[0]} x {calib.shape[1]} tokens")
    if real.name != "smollm2-135m-instruct":
        print("  caveat: these fp32 weights were dequantized from the GGUF's own 4-8-bit blocks, so the "
              "Δppl above is the cost of re-quantizing already-quantized weights")
        return
    print(f"  caveat: these fp32 weights were dequantized from the GGUF's Q4_1 (4 bits, blocks of 32), so they "
          f"already sit on a 4-bit grid: RTN 4-bit moves them by {grid_error(real.model, 32):.2%} at g32 "
          f"(Q4_1's own blocks, but with the integer zero points of the GPTQ format, where Q4_1 keeps a float "
          f"minimum) and {grid_error(real.model, group):.2%} at g{group} (relative weight error). "
          f"The Δppl above is the cost of re-quantizing 4-bit weights, smaller than quantizing the original "
          f"bf16 model would be, and a method's gain over RTN is smaller for the same reason.")
