"""Group-wise integer quantization (2/3/4/8 bits, asymmetric or symmetric) and RTN, its baseline.

A weight (out, in) is cut along its input dimension into groups of `group_size` columns; each
(output row, group) gets an fp16 scale and an integer zero point:

    code = clamp(round(w / scale) + zero, 0, 2**bits - 1)      w ~ (code - zero) * scale

Round-to-nearest (RTN) applies this directly. GPTQ and AWQ use the same grid (`group_params`,
`quantize_to_grid`) after changing what is rounded. The range rule is GPTQ's: [min(w, 0),
max(w, 0)] mapped onto 0..2**bits - 1. Two details keep every result storable as an AutoGPTQ v1
checkpoint: scales are rounded to fp16 before codes are computed (so the stored model is exactly
the one that was optimised), and zero points are at least 1 (v1 stores zero - 1 unsigned).

    gq = rtn_quantize(linear.weight, bits=4, group_size=128)
    w = gq.dequantize()
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GroupQuantized:
    """One weight in group-wise integer form (before packing into a checkpoint layout)."""

    codes: torch.Tensor  # uint8 (out, in), values in 0..2**bits - 1
    scales: torch.Tensor  # fp16 (groups, out)
    zeros: torch.Tensor  # int32 (groups, out)
    g_idx: torch.Tensor  # int32 (in,): the group of every input column
    bits: int
    group_size: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        g = self.g_idx.long()
        zeros = self.zeros[g].T.float()  # (out, in)
        scales = self.scales[g].T.float()
        return ((self.codes.float() - zeros) * scales).to(dtype)


def check_bits(bits: int) -> None:
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"group-wise quantization supports 2, 3, 4 or 8 bits, got {bits}")


def group_params(w: torch.Tensor, bits: int, sym: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 scale (rows,) (already rounded to fp16) and zero point (rows,) for rows of w (rows, cols)."""
    maxq = 2 ** bits - 1
    w = w.float()
    xmin = w.amin(dim=1).clamp(max=0)
    xmax = w.amax(dim=1).clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -1.0, xmin)
    xmax = torch.where(empty, 1.0, xmax)
    scale = ((xmax - xmin) / maxq).clamp(min=1e-7).half().float()
    if sym:
        return scale, torch.full_like(scale, (maxq + 1) // 2)
    zero = torch.round(-xmin / scale)
    # zero = 0 (a group with nothing below -scale/2) is not storable in AutoGPTQ v1: widen the
    # positive range instead, so [0, xmax] maps onto codes 1..maxq.
    low = zero < 1
    scale = torch.where(low, (xmax / (maxq - 1)).clamp(min=1e-7).half().float(), scale)
    zero = torch.where(low, torch.ones_like(zero), zero.clamp(max=maxq))
    return scale, zero


def quantize_to_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of w (rows, cols) on the grid of per-row scale and zero (as float)."""
    maxq = 2 ** bits - 1
    return torch.clamp(torch.round(w / scale.unsqueeze(1)) + zero.unsqueeze(1), 0, maxq)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """w rounded onto the grid and mapped back to floats (what the quantized layer computes with)."""
    return (quantize_to_grid(w, scale, zero, bits) - zero.unsqueeze(1)) * scale.unsqueeze(1)


def num_groups(in_features: int, group_size: int) -> int:
    return -(-in_features // group_size)


def rtn_quantize(weight: torch.Tensor, bits: int = 4, group_size: int = 128, sym: bool = False) -> GroupQuantized:
    """Round-to-nearest group-wise quantization of a weight (out, in); group_size -1 = one group."""
    check_bits(bits)
    out_f, in_f = weight.shape
    gs = in_f if group_size == -1 else group_size
    w = weight.detach().float()
    groups = num_groups(in_f, gs)
    codes = torch.empty(out_f, in_f, dtype=torch.uint8, device=w.device)
    scales = torch.empty(groups, out_f, dtype=torch.float16, device=w.device)
    zeros = torch.empty(groups, out_f, dtype=torch.int32, device=w.device)
    for g in range(groups):
        cols = slice(g * gs, min((g + 1) * gs, in_f))
        scale, zero = group_params(w[:, cols], bits, sym)
        codes[:, cols] = quantize_to_grid(w[:, cols], scale, zero, bits).to(torch.uint8)
        scales[g], zeros[g] = scale.half(), zero.int()
    g_idx = (torch.arange(in_f, device=w.device) // gs).int()
    return GroupQuantized(codes, scales, zeros, g_idx, bits, gs)
