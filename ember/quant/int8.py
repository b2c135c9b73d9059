"""Weight-only INT8: per-output-channel symmetric absmax, and the fastest CPU matmul for it.

Each row of a weight (one output channel) is scaled by 127 / max|row| and rounded, exactly as
bitsandbytes' `int8_vectorwise_quant` does, so an ember INT8 layer is stored as bitsandbytes'
LLM.int8 checkpoints are: an int8 `weight` and its fp32 row absmax `SCB` (w = q * SCB / 127).

The matmul keeps the weight in int8. On a CPU with PyTorch's `_weight_int8pack_mm` (an int8
weight x bf16 activation kernel) the activation is rounded to bf16 and the fp32 row scale is
applied to the output afterwards; elsewhere, or when a gradient must flow, the weight is
dequantized on the fly. `bench/quant.py` measures both against fp32.

    q, absmax = quantize_int8(linear.weight)
    y = int8_matmul(x, q, absmax)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes (out, in), fp32 absmax per row (out,)); an all-zero row stays zero."""
    w = weight.detach().float()
    absmax = w.abs().amax(dim=1)
    q = torch.round(w * (127.0 / absmax.unsqueeze(1)))
    q = torch.nan_to_num(q, nan=0.0)  # 0 * inf in an all-zero row
    return q.to(torch.int8), absmax


def dequantize_int8(q: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * (absmax / 127.0).unsqueeze(1)).to(dtype)


def has_int8_kernel(device: torch.device) -> bool:
    """Whether PyTorch has a fused int8-weight matmul for this device (CPU: torch >= 2.3)."""
    return device.type == "cpu" and hasattr(torch, "_weight_int8pack_mm")


def int8_matmul(x: torch.Tensor, q: torch.Tensor, absmax: torch.Tensor, bias: torch.Tensor | None = None,
                unit_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in) @ dequant(q).T + bias, keeping the weight in int8 when a kernel allows it.

    unit_scale: a cached bf16 tensor of ones (out,), saving an allocation per call.
    """
    fused = (has_int8_kernel(x.device) and not (torch.is_grad_enabled() and x.requires_grad)
             and x.dtype in (torch.float32, torch.bfloat16) and q.data_ptr() % 64 == 0)
    if not fused:
        return F.linear(x, dequantize_int8(q, absmax, x.dtype), bias)
    shape = x.shape
    if unit_scale is None:
        unit_scale = torch.ones(q.shape[0], dtype=torch.bfloat16, device=q.device)
    # The kernel multiplies by a bf16 scale; keep it at 1 and apply the fp32 scale after, so the
    # only roundings are the activation's and the output's (bf16), not a systematic per-row one.
    y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(torch.bfloat16).contiguous(), q, unit_scale)
    y = y.to(x.dtype) * (absmax / 127.0).to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*shape[:-1], q.shape[0])
