"""Quantized weights in the layouts of the native kernels (ember/engine/kernels/quant_linear.c),
and the multiply through them that the quantized Linear modules use.

A `PackedWeight` is one layer's weight as the kernel streams it: rows of blocks of 32 weights
with their scales beside them (the kernel's header lists the formats). GGUF blocks (Q8_0,
Q4_0, Q4_1) and ember's per-channel INT8 are used as they are stored; the layouts of the
Hugging Face formats are repacked once, at the first native call:

  GPTQ / AWQ / RTN (2-4 bits)  -> "q4z": fp16 scale, int8 zero, 16 bytes of nibbles per block.
       Needs every block of 32 input columns in one group: groups a multiple of 32 long, or one
       group per row; act-order (g_idx not sorted) columns are sorted by group and x is
       permuted to match. A last partial block is zero-padded, and so is x.
  NF4 (bitsandbytes)           -> "nf4": fp32 absmax, 16 bytes of nibbles per block.
       Needs in_features a multiple of 32 (a block of 32 in a row then lies in one absmax block).

The repacked copy is not module state: state_dict() and the saved checkpoint stay the
Hugging Face tensors. Where a layout cannot be built, `pack_*` returns None and the module
keeps its PyTorch path.

  packed(x, bias)    1..native.MAX_LINEAR_ROWS rows: the kernel (decode and small batches)
                     more rows (prefill): the weight dequantized natively (OUTPUT_CHUNK rows at
                     a time at most) and multiplied by BLAS
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ember.engine import native
from ember.quant.nf4 import NF4Weight, unpack_nf4_codes
from ember.quant.rtn import GroupQuantized

# Output rows dequantized at a time for a prefill product: bounds the fp32 copy of a very wide
# weight (an LM head). Narrower weights go whole: splitting them costs more in copying results
# than it saves (512 rows x SmolLM2's 7 projections, one thread: 16.2 ms in chunks of 1024 rows,
# 14.9 ms whole, fp32 BLAS on the dense weights 14.4 ms, of which dequantizing is 0.6 ms).
OUTPUT_CHUNK = 4096


class PackedWeight:
    """A weight (out_features, in_features) in a kernel format (see the module docstring).

    int8_activations: one-row products quantize x to int8 per block of 32 and use integer dot
    products (set by the layer that owns it; see QuantLinear.int8_activations)."""

    int8_activations = False

    @property
    def code(self) -> int:
        """The format number the kernels take."""
        return native.quant_code(self.fmt, self.int8_activations)

    def __init__(self, fmt: str, data: torch.Tensor, in_features: int, rscale: torch.Tensor | None = None,
                 perm: torch.Tensor | None = None) -> None:
        self.fmt, self.data, self.rscale, self.perm = fmt, data, rscale, perm
        self.out_features, self.in_features = data.shape[0], in_features
        self.width = in_features if fmt == "i8" else -(-in_features // 32) * 32  # K the kernel sees
        row_bytes = self.width if fmt == "i8" else self.width // 32 * native.QUANT_BLOCK_BYTES[fmt]
        if data.dtype != torch.uint8 or data.dim() != 2 or data.shape[1] != row_bytes or not data.is_contiguous():
            raise ValueError(f"{fmt} weight data must be contiguous uint8 (out, {row_bytes}), got "
                             f"{data.dtype} {tuple(data.shape)}")
        if (rscale is None) != (fmt != "i8"):
            raise ValueError("a row scale goes with the i8 format, and only with it")

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """x (rows, in_features) as the kernel reads it: fp32 contiguous, columns in packed order,
        zero-padded to the packed width."""
        if self.perm is None and self.width == self.in_features:
            return x.contiguous()
        out = x.new_zeros(x.shape[0], self.width)
        out[:, :self.in_features] = x if self.perm is None else x[:, self.perm]
        return out

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x (..., in_features) fp32 on CPU, no autograd -> (..., out_features)."""
        rows = x.numel() // self.in_features
        x2 = self.prepare(x.reshape(rows, self.in_features))
        if rows <= native.MAX_LINEAR_ROWS:
            y = native.quant_linear(self.fmt, self.data, self.rscale, bias, x2, self.out_features,
                                    self.int8_activations)
        else:
            y = self._prefill(x2, bias)
        return y.view(*x.shape[:-1], self.out_features)

    def _prefill(self, x2: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        n = self.out_features
        if n <= OUTPUT_CHUNK:
            return F.linear(x2, self._dense(0, n), bias)
        y = torch.empty(x2.shape[0], n, dtype=torch.float32)
        for s in range(0, n, OUTPUT_CHUNK):
            e = min(n, s + OUTPUT_CHUNK)
            y[:, s:e] = F.linear(x2, self._dense(s, e), None if bias is None else bias[s:e])
        return y

    def _dense(self, start: int, end: int) -> torch.Tensor:
        """Rows start..end of the fp32 weight in packed column order (packed width)."""
        rscale = None if self.rscale is None else self.rscale[start:end]
        return native.quant_dequantize(self.fmt, self.data[start:end], rscale, self.width)

    def dequantize(self) -> torch.Tensor:
        """The fp32 (out_features, in_features) weight in the layer's own column order."""
        w = self._dense(0, self.out_features)[:, :self.in_features]
        if self.perm is None:
            return w.contiguous()
        out = torch.empty_like(w)
        out[:, self.perm] = w
        return out


def pack_int8(q: torch.Tensor, absmax: torch.Tensor) -> PackedWeight:
    """ember's per-channel INT8 (int8 codes (out, in), fp32 row absmax) as it is stored: the
    codes are read in place, the row scale is absmax / 127 as dequantize_int8 computes it."""
    return PackedWeight("i8", q.contiguous().view(torch.uint8), q.shape[1], (absmax.float() / 127.0).contiguous())


def pack_gguf(blocks: torch.Tensor, fmt: str, in_features: int) -> PackedWeight:
    """GGUF Q8_0 / Q4_0 / Q4_1 blocks (out, row bytes), read as stored."""
    return PackedWeight(fmt, blocks, in_features)


def _nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Codes (out, blocks, 32) in 0..15 -> (out, blocks, 16) bytes, GGUF's order: weight j in the
    low nibble of byte j, weight j + 16 in its high nibble."""
    return (codes[..., :16] | (codes[..., 16:] << 4)).to(torch.uint8)


def pack_group(gq: GroupQuantized) -> PackedWeight | None:
    """Group-wise 2/3/4-bit codes (GPTQ, AWQ, RTN) as "q4z" blocks, or None where the blocks of
    32 input columns do not each fall in one group (or the codes are wider than 4 bits)."""
    if gq.bits > 4:
        return None
    out_f, in_f = gq.codes.shape
    g = gq.g_idx.long()
    perm = None
    if in_f > 1 and bool((g[1:] < g[:-1]).any()):  # act-order: sort the columns by group
        perm = torch.sort(g, stable=True).indices
        g = g[perm]
    width = -(-in_f // 32) * 32
    g_pad = torch.cat([g, g[-1:].expand(width - in_f)]).view(-1, 32)
    if not bool((g_pad == g_pad[:, :1]).all()):
        return None
    block_group = g_pad[:, 0]  # (blocks,)
    codes = gq.codes.long() if perm is None else gq.codes.long()[:, perm]
    codes = F.pad(codes, (0, width - in_f)).view(out_f, -1, 32)
    scales = gq.scales.half()[block_group].T.contiguous()  # (out, blocks) fp16
    zeros = gq.zeros[block_group].T.to(torch.int8).contiguous()
    blocks = torch.cat([scales.view(torch.uint8).view(out_f, -1, 2), zeros.view(torch.uint8).unsqueeze(-1),
                        torch.zeros(out_f, codes.shape[1], 1, dtype=torch.uint8), _nibbles(codes)], dim=-1)
    return PackedWeight("q4z", blocks.reshape(out_f, -1).contiguous(), in_f, perm=perm)


def pack_nf4(w: NF4Weight) -> PackedWeight | None:
    """bitsandbytes NF4 (plain or double-quantized) as "nf4" blocks with each block's fp32
    absmax (decoded as dequantize_nf4 decodes it), or None if in_features is not a multiple of 32."""
    out_f, in_f = w.shape
    if in_f % 32 or w.blocksize % 32:
        return None
    n = out_f * in_f
    codes = unpack_nf4_codes(w.packed, n).view(out_f, -1, 32)
    starts = torch.arange(0, n, 32, device=codes.device)
    absmax = w.block_absmax().float()[starts // w.blocksize].view(out_f, -1, 1).contiguous()
    blocks = torch.cat([absmax.view(torch.uint8).view(out_f, -1, 4), _nibbles(codes)], dim=-1)
    return PackedWeight("nf4", blocks.reshape(out_f, -1).contiguous(), in_f)


def runs_natively(packed: PackedWeight | None, x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether `packed(x, bias)` may compute a layer's forward: a packed CPU weight, fp32 x on CPU
    with at least one row, no autograd through x or bias, an fp32 bias, and the kernels built."""
    return (packed is not None and x.dtype == torch.float32 and x.device.type == "cpu" and x.numel() > 0
            and packed.data.device.type == "cpu"
            and not (torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)))
            and (bias is None or (bias.dtype == torch.float32 and bias.is_contiguous()))
            and native.available())
