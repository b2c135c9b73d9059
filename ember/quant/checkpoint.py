"""Loading quantized Hugging Face checkpoints: bitsandbytes (INT8, NF4), GPTQ and AWQ.

`ember.load_model` hands a folder here when its config.json has a `quantization_config`.
Which layers are quantized is read from the tensors themselves, so checkpoints from the HF
ecosystem (AutoGPTQ, AutoAWQ, transformers + bitsandbytes) load as well as ember's own:

    <name>.qweight                                -> GroupQuantLinear (gptq or awq layout)
    <name>.SCB                                    -> Int8Linear
    <name>.weight.quant_state.bitsandbytes__nf4   -> NF4Linear (double-quantized if
                                                     <name>.weight.nested_absmax exists)

The Transformer is built on the meta device, those layers are swapped for empty quantized
modules, and every tensor is assigned straight from the safetensors files. Saving needs no
code here: the quantized modules' state_dict already holds the checkpoint tensors and
`ember.save_model` copies `model.quantization_config` into config.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open

from ember.checkpoint.hf import CheckpointError, weight_files
from ember.config import ModelConfig
from ember.model.transformer import Transformer
from ember.quant.gguf_linear import GGUF_BLOCK_BYTES
from ember.quant.head import HEAD_KEY, quantize_head
from ember.quant.linear import QUANT_LINEARS, GroupQuantLinear, Int8Linear, NF4Linear

NF4_STATE = ".weight.quant_state.bitsandbytes__nf4"


def _check_config(q: dict[str, Any]) -> tuple[str, int, int]:
    """(method, bits, group_size) of a quantization_config ember can load, else a clear error."""
    method = q.get("quant_method")
    if method == "gptq":
        fmt = q.get("checkpoint_format", "gptq")
        if fmt != "gptq":
            raise CheckpointError(f"GPTQ checkpoint_format {fmt!r} is not supported; ember loads AutoGPTQ v1 "
                                  "('gptq') tensors")
    elif method == "awq":
        version = str(q.get("version", "gemm")).lower()
        if version != "gemm" or not q.get("zero_point", True):
            raise CheckpointError(f"AWQ version {version!r} (zero_point={q.get('zero_point')}) is not supported; "
                                  "ember loads the GEMM layout with zero points")
    elif method == "bitsandbytes":
        if q.get("load_in_4bit") and q.get("bnb_4bit_quant_type", "fp4") != "nf4":
            raise CheckpointError(f"bitsandbytes 4-bit type {q.get('bnb_4bit_quant_type')!r} is not supported; "
                                  "ember loads nf4")
        return method, 0, 0
    else:
        raise CheckpointError(f"config.json quantization_config has quant_method {method!r}; ember loads "
                              "gptq, awq and bitsandbytes (int8 / nf4) checkpoints")
    try:
        return method, int(q["bits"]), int(q.get("group_size", 128))
    except (KeyError, TypeError, ValueError):
        raise CheckpointError("config.json quantization_config needs integer 'bits' and 'group_size'") from None


def checkpoint_keys(folder: Path) -> dict[str, Path]:
    """Every tensor name in the checkpoint and the file holding it."""
    keys: dict[str, Path] = {}
    for path, names in weight_files(folder).items():
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in names if names is not None else f.keys():
                    keys[key] = path
        except SafetensorError as e:
            raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    return keys


def swap_quantized_skeleton(model: nn.Module, qcfg: dict[str, Any], keys: dict[str, Path] | set[str],
                            dtype: torch.dtype) -> int:
    """Replace each nn.Linear whose quantized tensors are in `keys` by an empty quantized module."""
    method, bits, group_size = _check_config(qcfg)
    swapped = 0
    for name, lin in list(model.named_modules()):
        if not isinstance(lin, nn.Linear):
            continue
        bias = f"{name}.bias" in keys
        if f"{name}.qweight" in keys:
            if method not in ("gptq", "awq"):
                raise CheckpointError(f"{name}.qweight found in a {method} checkpoint")
            new: nn.Module = GroupQuantLinear(lin.in_features, lin.out_features, lin.bias is not None, bits,
                                              group_size, method, dtype)
        elif f"{name}.SCB" in keys:
            new = Int8Linear(lin.in_features, lin.out_features, bias, dtype)
        elif name + NF4_STATE in keys:
            new = NF4Linear(lin.in_features, lin.out_features, bias, 64, f"{name}.weight.nested_absmax" in keys,
                            dtype)
        else:
            continue
        model.set_submodule(name, new)
        swapped += 1
    return swapped


def load_quantized(folder: Path, cfg: ModelConfig, qcfg: dict[str, Any], dtype: torch.dtype,
                   device: str | torch.device = "cpu") -> Transformer:
    """Build the model with quantized modules and fill it from the checkpoint."""
    keys = checkpoint_keys(folder)
    with torch.device("meta"):
        model = Transformer(cfg).to(dtype)
        if swap_quantized_skeleton(model, qcfg, keys, dtype) == 0:
            raise CheckpointError(f"config.json in {folder} declares {qcfg.get('quant_method')} quantization "
                                  "but no layer has quantized tensors")
    quant_prefixes = tuple(n + "." for n, m in model.named_modules() if isinstance(m, QUANT_LINEARS))
    state: dict[str, torch.Tensor] = {}
    for path in sorted(set(keys.values())):
        with safe_open(str(path), framework="pt") as f:
            for key in (k for k, p in keys.items() if p == path):
                t = f.get_tensor(key)
                in_quant = key.startswith(quant_prefixes) and not key.endswith(".bias")
                # Quantized tensors keep their stored dtype (packed ints, fp16 scales, fp32 absmax).
                state[key] = t if in_quant or not t.is_floating_point() else t.to(dtype)
    for key in [k for k in state if k.endswith(".rotary_emb.inv_freq")]:
        del state[key]
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        first = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e))
        raise CheckpointError(f"quantized checkpoint in {folder} does not fit its config: {first}") from None
    missing = [k for k in missing if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing:
        raise CheckpointError(f"checkpoint in {folder} lacks {len(missing)} tensor(s), e.g. {missing[0]!r}")
    if unexpected:
        raise CheckpointError(f"checkpoint has {len(unexpected)} tensor(s) the config does not describe, "
                              f"e.g. {unexpected[0]!r}")
    model.tie_weights()
    model.quantization_config = dict(qcfg)
    head_type = qcfg.get(HEAD_KEY)
    if head_type:
        if head_type not in GGUF_BLOCK_BYTES:
            raise CheckpointError(f"config.json in {folder}: {HEAD_KEY} is {head_type!r}; ember keeps heads in "
                                  f"{', '.join(GGUF_BLOCK_BYTES)}")
        quantize_head(model, head_type)
    return model.to(device).eval()
