"""Quantized replacements for nn.Linear, swapped into the one Transformer by module swap.

Each keeps its weight packed in memory and computes y = x W^T + b from it, so the model runs
unchanged under `ember.generate`, the serving engine and perplexity evaluation:

  Int8Linear        int8 weight + fp32 row absmax (bitsandbytes LLM.int8 layout); on the
                    PyTorch path, its fused CPU int8 matmul when it has one
  NF4Linear         NF4 codes, two per byte + absmax / double-quantized state (bitsandbytes
                    Linear4bit layout); dequantized on the fly
  GroupQuantLinear  2/3/4/8-bit group-wise codes in the AutoGPTQ v1 (`layout="gptq"`) or AutoAWQ
                    GEMM (`layout="awq"`) tensors; dequantized on the fly
  (GGUFLinear, raw GGUF Q8_0 / Q4_0 / Q4_1 blocks, is in gguf_linear.py; QUANT_LINEARS lists all.)

On CPU in fp32 without autograd, each computes through the native quantized kernels
(ember/engine/kernels/quant_linear.c; the weight stays quantized, repacked once where its
format needs it, see native_layout.py): up to 128 rows by dequantizing in registers, more rows
(prefill) by dequantizing a chunk of output rows at a time for BLAS. Elsewhere, or without the
kernels, it dequantizes in PyTorch and multiplies (the reference the kernels are tested against).

Their `state_dict()` holds exactly the tensors of the Hugging Face checkpoint formats, so
`ember.save_model` writes them unchanged. Weights are buffers: they never receive gradients,
while the forward stays differentiable with respect to the input. That makes NF4Linear the
frozen base of QLoRA:

    base = NF4Linear.from_linear(nn.Linear(4096, 4096), double_quant=True)
    y = base(x)                     # x.requires_grad -> y.grad_fn; base has no trainable weight
"""

from __future__ import annotations

import json
import math

import torch
import torch.nn as nn

from ember.quant.base import QuantLinear, bias_param
from ember.quant.gguf_linear import GGUFLinear
from ember.quant.int8 import dequantize_int8, int8_matmul, quantize_int8
from ember.quant.native_layout import PackedWeight, pack_group, pack_int8, pack_nf4
from ember.quant.nf4 import NESTED_BLOCKSIZE, NF4_CODE, NF4Weight, dequantize_nf4, dynamic_map, quantize_nf4
from ember.quant.packing import pack_awq, pack_cols, pack_rows, packed_length, unpack_awq, unpack_cols, unpack_rows
from ember.quant.rtn import GroupQuantized, check_bits, num_groups


class Int8Linear(QuantLinear):
    """Weight-only INT8, per output channel (state: `weight` int8, `SCB` fp32 row absmax)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__(in_features, out_features, bias, dtype)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("SCB", torch.zeros(out_features, dtype=torch.float32))
        self._unit_scale: torch.Tensor | None = None  # bf16 ones for the fused kernel (not state)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.dtype)
        m.weight, m.SCB = quantize_int8(linear.weight)
        m.bias = bias_param(linear.bias)
        return m.to(linear.weight.device)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int8(self.weight, self.SCB, dtype)

    def _pack_sources(self) -> tuple[torch.Tensor, ...]:
        return self.weight, self.SCB

    def _pack(self) -> PackedWeight | None:
        return pack_int8(self.weight, self.SCB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.data_ptr() % 64:
            # PyTorch's CPU int8 kernel (the reference path) crashes on weights not 64-byte
            # aligned, as tensors read from a safetensors file can be; a fresh allocation is aligned.
            self.weight = self.weight.clone()
        return super().forward(x)

    def _reference(self, x: torch.Tensor) -> torch.Tensor:
        if self._unit_scale is None or self._unit_scale.device != self.weight.device:
            self._unit_scale = torch.ones(self.out_features, dtype=torch.bfloat16, device=self.weight.device)
        return int8_matmul(x, self.weight, self.SCB, self.bias, self._unit_scale)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight_format"] = torch.tensor(0, dtype=torch.uint8)  # bitsandbytes: row-major

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        fmt = state_dict.pop(prefix + "weight_format", None)
        if fmt is not None and int(fmt) != 0:
            error_msgs.append(f"{prefix}weight_format is {int(fmt)}; only bitsandbytes' row-major (0) loads")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class NF4Linear(QuantLinear):
    """NF4 weight with bitsandbytes' state, optionally double-quantized (QLoRA's frozen base).

    Build it from a trained layer with `NF4Linear.from_linear(linear, double_quant=True)`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, blocksize: int = 64,
                 double_quant: bool = False, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(in_features, out_features, bias, dtype)
        n = in_features * out_features
        blocks = math.ceil(n / blocksize)
        self.blocksize, self.double_quant, self.offset = blocksize, double_quant, 0.0
        self.quant_dtype = dtype  # the dtype of the weight that was quantized (recorded by bitsandbytes)
        self.register_buffer("weight", torch.zeros(math.ceil(n / 2), 1, dtype=torch.uint8))
        self.register_buffer("absmax", torch.zeros(blocks, dtype=torch.uint8 if double_quant else torch.float32))
        if double_quant:
            self.register_buffer("nested_absmax", torch.zeros(math.ceil(blocks / NESTED_BLOCKSIZE)))

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = False) -> "NF4Linear":
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, blocksize, double_quant,
                linear.weight.dtype)
        w4 = quantize_nf4(linear.weight, blocksize, double_quant)
        m.weight, m.absmax = w4.packed, w4.absmax
        if double_quant:
            m.nested_absmax, m.offset = w4.nested_absmax, w4.offset
        m.bias = bias_param(linear.bias)
        return m.to(linear.weight.device)

    def nf4_weight(self) -> NF4Weight:
        return NF4Weight(self.weight, self.absmax, (self.out_features, self.in_features), self.blocksize,
                         self.nested_absmax if self.double_quant else None,
                         self.offset if self.double_quant else None)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_nf4(self.nf4_weight(), dtype)

    def _pack_sources(self) -> tuple[torch.Tensor, ...]:
        return (self.weight, self.absmax, self.nested_absmax) if self.double_quant else (self.weight, self.absmax)

    def _pack(self) -> PackedWeight | None:
        return pack_nf4(self.nf4_weight())

    # bitsandbytes / transformers serialise Linear4bit as `weight` plus `weight.<state>` tensors,
    # the non-tensor state packed as JSON bytes.
    def _state_name(self) -> str:
        return "quant_state.bitsandbytes__nf4"

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        w = prefix + "weight"
        destination[w] = self.weight
        destination[w + ".absmax"] = self.absmax
        destination[w + ".quant_map"] = NF4_CODE.to(self.weight.device, copy=True)
        meta = {"quant_type": "nf4", "blocksize": self.blocksize,
                "dtype": str(self.quant_dtype).removeprefix("torch."),
                "shape": [self.out_features, self.in_features]}
        if self.double_quant:
            destination[w + ".nested_absmax"] = self.nested_absmax
            destination[w + ".nested_quant_map"] = dynamic_map().to(self.weight.device)
            meta.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=self.offset)
        destination[w + "." + self._state_name()] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        w = prefix + "weight"
        raw = state_dict.get(w + "." + self._state_name())
        if raw is None:
            missing_keys.append(w + "." + self._state_name())
            return
        meta = json.loads(bytes(raw.to(torch.uint8).tolist()).decode("utf-8"))
        want = {"quant_type": "nf4", "blocksize": self.blocksize, "shape": [self.out_features, self.in_features]}
        got = {k: meta.get(k) for k in want}
        if got != want or ("nested_offset" in meta) != self.double_quant:
            error_msgs.append(f"{w}: quantization state {meta} does not match the layer {want} "
                              f"(double quantization {self.double_quant})")
            return
        names = {"weight": w, "absmax": w + ".absmax"}
        if self.double_quant:
            names["nested_absmax"] = w + ".nested_absmax"
            self.offset = float(meta["nested_offset"])
        self.quant_dtype = getattr(torch, meta.get("dtype", "float32"), torch.float32)
        for attr, key in names.items():
            if key not in state_dict:
                missing_keys.append(key)
                continue
            t, buf = state_dict[key], getattr(self, attr)
            if t.shape != buf.shape:
                error_msgs.append(f"{key} has shape {tuple(t.shape)}, expected {tuple(buf.shape)}")
                continue
            setattr(self, attr, t.to(buf.dtype))
        if self.bias is not None:
            if prefix + "bias" in state_dict:
                self.bias = nn.Parameter(state_dict[prefix + "bias"].to(self.bias.dtype), requires_grad=False)
            else:
                missing_keys.append(prefix + "bias")
        consumed = set(names.values()) | {w + "." + self._state_name(), w + ".quant_map",
                                          w + ".nested_quant_map", prefix + "bias"}
        unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in consumed)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", blocksize={self.blocksize}, double_quant={self.double_quant}"


class GroupQuantLinear(QuantLinear):
    """Group-wise integer weight in the AutoGPTQ v1 or AutoAWQ GEMM tensor layout (see packing.py)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, bits: int = 4,
                 group_size: int = 128, layout: str = "gptq", dtype: torch.dtype = torch.float32) -> None:
        super().__init__(in_features, out_features, bias, dtype)
        check_bits(bits)
        if layout not in ("gptq", "awq"):
            raise ValueError(f"unknown layout {layout!r}; use 'gptq' or 'awq'")
        if layout == "awq" and bits != 4:
            raise ValueError("the AWQ GEMM layout holds 4-bit codes only")
        gs = in_features if group_size == -1 else group_size
        self.bits, self.group_size, self.layout = bits, gs, layout
        groups = num_groups(in_features, gs)
        if layout == "gptq":
            self.register_buffer("qweight", torch.zeros(packed_length(in_features, bits), out_features,
                                                        dtype=torch.int32))
            self.register_buffer("qzeros", torch.zeros(groups, packed_length(out_features, bits), dtype=torch.int32))
            self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16))
            self.register_buffer("g_idx", (torch.arange(in_features) // gs).int())
        else:
            self.register_buffer("qweight", torch.zeros(in_features, packed_length(out_features, 4),
                                                        dtype=torch.int32))
            self.register_buffer("qzeros", torch.zeros(groups, packed_length(out_features, 4), dtype=torch.int32))
            self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16))

    @classmethod
    def from_quantized(cls, gq: GroupQuantized, bias: torch.Tensor | None = None, layout: str = "gptq",
                       dtype: torch.dtype = torch.float32) -> "GroupQuantLinear":
        out_f, in_f = gq.codes.shape
        m = cls(in_f, out_f, bias is not None, gq.bits, gq.group_size, layout, dtype)
        if layout == "gptq":
            m.qweight = pack_rows(gq.codes.T, gq.bits)
            m.qzeros = pack_cols(gq.zeros - 1, gq.bits)  # AutoGPTQ v1 stores zero - 1
            m.g_idx = gq.g_idx.int()
        else:
            if not torch.equal(gq.g_idx.long(), torch.arange(in_f, device=gq.g_idx.device) // gq.group_size):
                raise ValueError("the AWQ layout cannot hold reordered groups (act-order); use the GPTQ layout")
            m.qweight = pack_awq(gq.codes.T)
            m.qzeros = pack_awq(gq.zeros)
        m.scales = gq.scales.half()
        m.bias = bias_param(bias)
        return m.to(gq.codes.device)

    def group_quantized(self) -> GroupQuantized:
        """Unpack into codes / scales / zeros / g_idx (the layout-independent form)."""
        if self.layout == "gptq":
            codes = unpack_rows(self.qweight, self.bits, self.in_features).T
            zeros = unpack_cols(self.qzeros, self.bits, self.out_features) + 1
            g_idx = self.g_idx
        else:
            codes = unpack_awq(self.qweight).T
            zeros = unpack_awq(self.qzeros)
            g_idx = (torch.arange(self.in_features, device=self.qweight.device) // self.group_size).int()
        return GroupQuantized(codes.to(torch.uint8), self.scales, zeros.int(), g_idx, self.bits, self.group_size)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.layout == "gptq":
            codes = unpack_rows(self.qweight, self.bits, self.in_features)  # (in, out)
            zeros = unpack_cols(self.qzeros, self.bits, self.out_features) + 1  # (groups, out)
            g = self.g_idx.long()
        else:
            codes = unpack_awq(self.qweight)
            zeros = unpack_awq(self.qzeros)
            g = torch.arange(self.in_features, device=codes.device) // self.group_size
        w_t = (codes - zeros[g]).float() * self.scales.float()[g]  # (in, out)
        return w_t.T.to(dtype)

    def _pack_sources(self) -> tuple[torch.Tensor, ...]:
        if self.layout == "gptq":
            return self.qweight, self.qzeros, self.scales, self.g_idx
        return self.qweight, self.qzeros, self.scales

    def _pack(self) -> PackedWeight | None:
        return pack_group(self.group_quantized())

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        # AutoGPTQ writes an fp16 bias for every layer, zeros where the model has none.
        bias = state_dict.get(prefix + "bias")
        if bias is not None and self.bias is None and not bool(bias.any()):
            state_dict.pop(prefix + "bias")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", bits={self.bits}, group_size={self.group_size}, layout={self.layout}"


QUANT_LINEARS = (Int8Linear, NF4Linear, GroupQuantLinear, GGUFLinear)


def quantizable_linears(model: nn.Module, skip: tuple[str, ...] = ()) -> dict[str, nn.Linear]:
    """The nn.Linear layers of the transformer blocks, by name; MoE routers and `skip` stay dense.

    The embedding and LM head are left in floating point, as GPTQ, AWQ and bitsandbytes do.
    """
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not name.startswith("model.layers."):
            continue
        if name.endswith("block_sparse_moe.gate") or any(name == s or name.endswith("." + s) for s in skip):
            continue
        out[name] = module
    return out


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and persistent buffer (a tied tensor counted once)."""
    seen, total = set(), 0
    for module in model.modules():
        tensors = list(module._parameters.values())
        tensors += [b for n, b in module._buffers.items() if n not in module._non_persistent_buffers_set]
        for t in tensors:
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
