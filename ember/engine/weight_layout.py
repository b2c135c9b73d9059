"""How the engine lays out and multiplies the model's linear weights for decode on CPU.

A decode step multiplies a few activation rows (one per running sequence) by every weight
matrix, so it is bound by how fast the weights stream from memory at a few rows and by how
well that streaming overlaps the arithmetic at dozens. Measured on the development machine
(AMD EPYC, one thread, fp32), GB/s of weight read at batch 1 (the copy bandwidth is ~25 GB/s):

    shape (out x in)     BLAS row-major   BLAS column-major   native (row-major)
    512 x 512               10.1              12.2                 ~20
    1536 x 512 (q|k|v)      10.4              17.3                 ~22
    2816 x 512 (gate|up)    10.7              20.0                 ~21
    512 x 1408 (down)       15.0              11.5                 ~16
    32000 x 512 (lm_head)   10.8              24.1                 ~23

and GFLOP/s over the ten layers of bench-50m streamed from DRAM, 8 / 16 / 32 / 64 / 128 rows:
BLAS 29 / 44 / 61 / 75 / 78, native (ember/engine/kernels/linear.c) 62 / 85 / 88 / 89 / 87.

So `relayout_for_decode`, run by the engine on the model it serves, in place:
  1. fuses q/k/v and gate/up into one weight buffer each (ember/model/fused.py): one wider
     matmul instead of two or three narrow ones;
  2. with the native kernels (ember/engine/native.py): keeps weights row-major and turns every
     plain nn.Linear into a `DecodeLinear`, whose products over up to native.MAX_LINEAR_ROWS
     rows use the native kernel (more rows, grad, other dtypes: F.linear as before), every
     RMSNorm into a `DecodeRMSNorm` (the native norm, for any number of rows), every
     Attention into a `DecodeAttention` (native RoPE) and every MLP into a `DecodeMLP`
     (native silu(gate) * up);
     without them: stores wide weights column-major, where BLAS's matvec reads them faster.
Large-batch matmuls run at the same speed in every layout (N = 256: 86-98 GFLOP/s), so prefill
loses nothing. Values never change, only strides and the multiply: state_dict(), checkpoints,
LoRA and quantization see the same weights (save_model writes contiguous copies). A tied
embedding stored column-major makes token lookups strided; at one row per token that costs far
less than the head gains.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ember.engine import native
from ember.model.transformer import MLP, Attention, RMSNorm


OUTPUT_CHUNK = 2048  # rows of a very wide weight (an LM head) multiplied at a time


class DecodeLinear(nn.Linear):
    """An nn.Linear whose products over a few rows go through the native kernel.

    A very wide layer (the LM head) applied to more rows than that is computed by BLAS in
    chunks of OUTPUT_CHUNK outputs: each chunk's result stays in cache while it is written.
    Measured for 32000 x 512 at 8-128 rows, one thread: 22-77 GFLOP/s in one matmul, 28-86 in
    chunks of 2048.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows > native.MAX_LINEAR_ROWS and self.out_features >= 4 * OUTPUT_CHUNK and not torch.is_grad_enabled():
            out = torch.empty(*x.shape[:-1], self.out_features, dtype=x.dtype, device=x.device)
            for s in range(0, self.out_features, OUTPUT_CHUNK):
                e = s + OUTPUT_CHUNK
                out[..., s:e] = F.linear(x, self.weight[s:e], None if self.bias is None else self.bias[s:e])
            return out
        return native.linear(x, self.weight, self.bias)


class DecodeAttention(Attention):
    """The model's attention with RoPE through the native kernel (one pass instead of four
    operators per tensor; PyTorch where the kernel does not apply)."""

    def rotate(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return native.rope(q, cos, sin), native.rope(k, cos, sin)


class DecodeMLP(MLP):
    """The model's SwiGLU with silu(gate) * up through the native kernel (one pass over the fused
    projection's halves instead of two operators and a temporary)."""

    def activate(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return native.silu_mul(gate, up)


class DecodeRMSNorm(RMSNorm):
    """The model's RMSNorm, computed natively for fp32 rows without autograd (4-10x faster than PyTorch's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            return super().forward(x)
        return native.rms_norm(x, self.weight, self.eps)


# Exact model classes the native kernels take over (their forward, nothing else, changes).
# (Blocks become ember/engine/fused_layer.py's DecodeBlocks, which build on these.)
NATIVE_SWAPS: dict[type[nn.Module], type[nn.Module]] = {
    RMSNorm: DecodeRMSNorm, Attention: DecodeAttention, MLP: DecodeMLP}


def wants_column_major(weight: torch.Tensor) -> bool:
    """True for a 2-D CPU weight at least as wide as it is tall, not already column-major."""
    if weight.dim() != 2 or weight.device.type != "cpu" or not weight.dtype.is_floating_point:
        return False
    out_features, in_features = weight.shape
    return out_features >= in_features and weight.stride(0) != 1


def relayout_for_decode(model: nn.Module) -> str:
    """Prepare `model`'s linear layers for decode on CPU (see the module docstring), in place.

    Returns what was done: "native", "column-major", or "none" (not on CPU). Only exact
    nn.Linear, RMSNorm, Attention and MLP modules change: quantized and other swapped-in modules
    own their layouts.
    """
    if next(model.parameters()).device.type != "cpu":
        return "none"
    use_native = native.available()
    fn, column_major = (native.linear, False) if use_native else (F.linear, True)
    with torch.no_grad():
        for module in list(model.modules()):
            if hasattr(module, "fuse_projections"):
                module.fuse_projections(fn, column_major)
        for module in model.modules():
            if use_native and type(module) in NATIVE_SWAPS:
                module.__class__ = NATIVE_SWAPS[type(module)]
            if type(module) is not nn.Linear:
                continue
            if use_native:
                # Same object, parameters and hooks; only forward changes (LoRA wrappers and
                # fused groups keep their references).
                module.__class__ = DecodeLinear
            elif wants_column_major(module.weight):
                module.weight.data = module.weight.data.t().contiguous().t()  # same Parameter: ties survive
    return "native" if use_native else "column-major"
