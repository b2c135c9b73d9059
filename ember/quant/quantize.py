"""quantize_model: one entry point for every method, ending in a module swap on the Transformer.

    cfg = QuantConfig(method="gptq", bits=4, group_size=128)
    ids = calibration_ids(tok, ["bundled"], cfg.calib_samples, cfg.calib_seq_len)
    model = quantize_model(model, cfg, ids)       # in place; nn.Linear -> quantized modules
    ember.save_model(model, "out")                # config.json gets `quantization_config`

Methods and the checkpoint format each produces (Hugging Face's `quantization_config`):
  int8  per-channel absmax INT8          bitsandbytes load_in_8bit
  nf4   NF4, blocks of 64 (+ double q.)  bitsandbytes load_in_4bit, nf4
  rtn   round-to-nearest, group-wise     gptq (AutoGPTQ v1 tensors)
  gptq  GPTQ, group-wise                 gptq (AutoGPTQ v1 tensors)
  awq   AWQ, group-wise                  awq (AutoAWQ GEMM tensors; other bit widths: gptq tensors)
The embedding and LM head stay in floating point (as in all three formats), unless
`quantize_head` keeps them in Q8_0 in memory (ember/quant/head.py; the checkpoint still holds them
in floating point and records it, so ember.load_model quantizes them again).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn

from ember import __version__
from ember.errors import EmberError
from ember.quant.awq import awq_quantize_model
from ember.quant.gptq import gptq_quantize_model
from ember.quant.head import HEAD_KEY, HEAD_TYPE, quantize_head
from ember.quant.linear import GroupQuantLinear, Int8Linear, NF4Linear, quantizable_linears
from ember.quant.packing import packed_length
from ember.quant.rtn import GroupQuantized, rtn_quantize

Method = Literal["int8", "nf4", "rtn", "gptq", "awq"]
METHODS: tuple[str, ...] = ("int8", "nf4", "rtn", "gptq", "awq")
CALIBRATED = ("gptq", "awq")


class QuantizationError(EmberError):
    """Settings or a model that the chosen quantization method cannot handle."""


@dataclass
class QuantConfig:
    """How to quantize (the group-wise settings apply to rtn, gptq and awq)."""

    method: Method = "int8"
    bits: int = 4
    group_size: int = 128  # -1: one group per output row
    sym: bool = False  # symmetric grid (zero point fixed mid-range) for rtn/gptq
    double_quant: bool = True  # nf4: quantize the absmax constants too
    act_order: bool = False  # gptq: visit columns by decreasing Hessian diagonal
    damp_percent: float = 0.01  # gptq: dampening, a fraction of the mean Hessian diagonal
    awq_clip: bool = True  # awq: search a clipping range per group
    awq_grid: int = 20  # awq: points of the alpha grid
    skip: tuple[str, ...] = ()  # names (or name suffixes) of block linears to keep in float
    quantize_head: bool = False  # embedding and LM head in Q8_0 blocks too (ember/quant/head.py)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise QuantizationError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.method in ("rtn", "gptq", "awq"):
            if self.bits not in (2, 3, 4, 8):
                raise QuantizationError(f"--bits must be 2, 3, 4 or 8 for {self.method}, got {self.bits}")
            if self.group_size != -1 and self.group_size < 1:
                raise QuantizationError(f"--group-size must be positive or -1, got {self.group_size}")
        if not 0 < self.damp_percent < 1:
            raise QuantizationError(f"damp_percent must be in (0, 1), got {self.damp_percent}")

    @property
    def layout(self) -> str:
        return "awq" if self.method == "awq" and self.bits == 4 and not self.sym else "gptq"

    def bits_label(self) -> str:
        return {"int8": "8", "nf4": "4"}.get(self.method, str(self.bits))


def hf_quantization_config(cfg: QuantConfig) -> dict[str, Any]:
    """The `quantization_config` entry of config.json, as transformers writes it."""
    skip = list(cfg.skip) + ["lm_head"]
    if cfg.method == "int8":
        return {"quant_method": "bitsandbytes", "load_in_8bit": True, "load_in_4bit": False,
                "llm_int8_threshold": 6.0, "llm_int8_skip_modules": skip, "llm_int8_has_fp16_weight": False}
    if cfg.method == "nf4":
        return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
                "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": cfg.double_quant,
                "bnb_4bit_compute_dtype": "float32", "bnb_4bit_quant_storage": "uint8",
                "llm_int8_skip_modules": skip}
    meta = {"quantizer": [f"ember:{__version__}"], "method": cfg.method}
    if cfg.layout == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": cfg.group_size, "zero_point": True,
                "version": "gemm", "modules_to_not_convert": list(cfg.skip) or None, "meta": meta}
    return {"quant_method": "gptq", "bits": cfg.bits, "group_size": cfg.group_size, "desc_act": cfg.act_order,
            "sym": cfg.sym, "damp_percent": cfg.damp_percent, "true_sequential": True, "static_groups": False,
            "checkpoint_format": "gptq", "meta": meta}


def _check_shapes(linears: dict[str, nn.Linear], cfg: QuantConfig) -> None:
    for name, lin in linears.items():
        try:
            if cfg.layout == "awq":
                packed_length(lin.out_features, 4)
            else:
                packed_length(lin.in_features, cfg.bits)
                packed_length(lin.out_features, cfg.bits)
        except ValueError as e:
            raise QuantizationError(f"{name} ({lin.in_features} -> {lin.out_features}) cannot be packed at "
                                    f"{cfg.bits} bits: {e}; skip it with --skip or choose other bits") from None


@torch.no_grad()
def quantize_model(model: nn.Module, cfg: QuantConfig, calibration: torch.Tensor | None = None) -> nn.Module:
    """Quantize the model's block linears in place (GPTQ and AWQ need calibration token ids)."""
    cfg.validate()
    if cfg.method in CALIBRATED and calibration is None:
        raise QuantizationError(f"{cfg.method} needs calibration token ids (see calibration_ids)")
    if getattr(model, "quantization_config", None):
        raise QuantizationError("this model is already quantized; start from the unquantized checkpoint")
    linears = quantizable_linears(model, cfg.skip)
    if not linears:
        raise QuantizationError("the model has no linear layers to quantize")
    dtype = next(model.parameters()).dtype
    if cfg.method in ("rtn", "gptq", "awq"):
        _check_shapes(linears, cfg)
    if cfg.method in CALIBRATED and dtype != torch.float32:
        raise QuantizationError(f"{cfg.method} calibrates in float32; load the model with dtype float32")

    replacements: dict[str, nn.Module] = {}
    if cfg.method == "int8":
        replacements = {n: Int8Linear.from_linear(lin) for n, lin in linears.items()}
    elif cfg.method == "nf4":
        replacements = {n: NF4Linear.from_linear(lin, double_quant=cfg.double_quant) for n, lin in linears.items()}
    else:
        if cfg.method == "rtn":
            results = {n: rtn_quantize(lin.weight, cfg.bits, cfg.group_size, cfg.sym) for n, lin in linears.items()}
        elif cfg.method == "gptq":
            results = gptq_quantize_model(model, calibration, linears, cfg.bits, cfg.group_size, cfg.sym,
                                          cfg.act_order, cfg.damp_percent)
        else:
            results = awq_quantize_model(model, calibration, linears, cfg.bits, cfg.group_size, cfg.awq_grid,
                                         cfg.awq_clip)
        replacements = {n: _group_linear(results[n], linears[n], cfg.layout) for n in linears}
    for name, module in replacements.items():
        model.set_submodule(name, module)
    model.quantization_config = hf_quantization_config(cfg)
    if cfg.quantize_head:
        quantize_head(model, HEAD_TYPE)
        model.quantization_config[HEAD_KEY] = HEAD_TYPE
    return model


def _group_linear(gq: GroupQuantized, linear: nn.Linear, layout: str) -> GroupQuantLinear:
    return GroupQuantLinear.from_quantized(gq, linear.bias, layout, linear.weight.dtype)
