"""The base of ember's quantized Linear modules: shape attributes, a floating-point bias, and the
choice between the native quantized kernels and the PyTorch reference path.

A subclass stores its weight in its checkpoint format and says how to compute with it:
`dequantize(dtype)` (the reference: dense weight, then F.linear), `_pack_sources()` (the state
tensors the kernels' copy is built from) and `_pack()` (that copy, a native_layout.PackedWeight,
or None where no kernel takes the layer). `forward` uses the kernels where runs_natively()
allows (CPU, fp32, no autograd, kernels built), the reference elsewhere.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from ember.quant.native_layout import PackedWeight, runs_natively


def _version(t: torch.Tensor) -> int:
    """t's in-place modification counter; inference tensors (made under torch.inference_mode)
    keep none, so only their replacement is seen."""
    return -1 if t.is_inference() else t._version


def bias_param(linear_bias: torch.Tensor | None) -> nn.Parameter | None:
    if linear_bias is None:
        return None
    return nn.Parameter(linear_bias.detach().clone(), requires_grad=False)


class QuantLinear(nn.Module):
    """Shared shape attributes, bias handling (the bias stays in floating point) and the choice
    between the native kernels and the PyTorch reference path.

    int8_activations (default False, fp32 activations): one-row native products quantize x to
    int8 per block of 32 and multiply in integers, as llama.cpp does (see
    kernels/quant_linear.c); the serving engine sets it where asked (EngineConfig)."""

    int8_activations = False

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None
        self._packed: PackedWeight | None = None  # the kernels' copy of the weight (not state)
        self._packed_key: tuple[tuple[torch.Tensor, int], ...] | None = None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense (out, in) weight this layer computes with."""
        raise NotImplementedError

    def _pack_sources(self) -> tuple[torch.Tensor, ...]:
        """The state tensors the packed weight is built from."""
        raise NotImplementedError

    def _pack(self) -> PackedWeight | None:
        """The weight in a native kernel's layout, or None where no kernel takes it."""
        raise NotImplementedError

    def packed_weight(self) -> PackedWeight | None:
        """The kernels' copy of the weight, built on first use and rebuilt whenever a source
        tensor was replaced (load_state_dict, .to()) or modified in place (its version moved)."""
        sources = self._pack_sources()
        key = self._packed_key
        if key is None or len(key) != len(sources) or \
                any(old is not t or version != _version(t) for (old, version), t in zip(key, sources)):
            cpu = all(t.device.type == "cpu" for t in sources)
            self._packed = self._pack() if cpu else None
            self._packed_key = tuple((t, _version(t)) for t in sources)
        packed = self._packed
        if packed is not None and packed.int8_activations != self.int8_activations:
            # a new object, so that plans holding the old one (ember/engine/fused_layer.py) rebuild
            packed = self._packed = copy.copy(packed)
            packed.int8_activations = self.int8_activations
        return packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self.packed_weight() if x.device.type == "cpu" else None
        if runs_natively(packed, x, self.bias):
            return packed(x, self.bias)
        return self._reference(x)

    def _reference(self, x: torch.Tensor) -> torch.Tensor:
        """The PyTorch path: dequantize, then multiply."""
        return F.linear(x, self.dequantize(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
