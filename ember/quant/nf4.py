"""NF4 (QLoRA's 4-bit NormalFloat), bit-for-bit the layout of bitsandbytes' `quantize_4bit`.

A weight is flattened and cut into blocks of `blocksize` (64) values. Each block is divided by
its absolute maximum (kept in fp32) and every value is rounded to the nearest of the 16 NF4
code values (quantiles of a normal distribution, bitsandbytes' table). Two codes share a byte,
the earlier value in the high nibble. With double quantization the fp32 absmax constants are
themselves quantized: their mean is subtracted and the rest is stored as 8-bit codes of
bitsandbytes' signed "dynamic" map in blocks of 256 with an fp32 absmax each, which brings the
constants from 32/64 = 0.5 to ~0.127 bits per weight.

    w4 = quantize_nf4(weight, double_quant=True)     # NF4Weight: packed bytes + absmax state
    w = dequantize_nf4(w4, torch.bfloat16)           # back to a dense (out, in) weight

The tests compare `packed`, `absmax` and the nested state with bitsandbytes on random tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The 16 NF4 values (QLoRA appendix; bitsandbytes' `get_4bit_type("nf4")`), ascending.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256  # bitsandbytes' block size for the double-quantized absmax


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit "dynamic" code (Dettmers 2016): 256 sorted fp32 values.

    For exponent i in 0..6 it holds 2**i evenly spaced fractions in (0.1, 1] (the midpoints of
    2**i + 1 linspace points) times 10**(i - 6), with both signs; then 0 and 1, then zeros to
    fill 256 entries (which sort to the middle).
    """
    values: list[float] = []
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        # Products in fp32 (not Python floats), as bitsandbytes computes them.
        values += ((10 ** (i - 6)) * means).tolist() + ((-(10 ** (i - 6))) * means).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


def _blocks(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale each block of a flat fp32 tensor into [-1, 1]: (scaled values, fp32 absmax per block)."""
    n = flat.numel()
    full = n - n % blocksize
    body = flat[:full].reshape(-1, blocksize)
    absmax = body.abs().amax(dim=-1)
    scaled = torch.clamp(body * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1), -1, 1).reshape(-1)
    if full < n:  # a last, shorter block
        tail_max = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_max, -1, 1)])
    return scaled, absmax


def _nearest(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest value of a sorted code (ties go to the upper value, as bitsandbytes)."""
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, midpoints, out_int32=True).to(torch.uint8)


def _lut_8bit(code: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' CPU lookup table: 65536 evenly spaced points of [-1, 1] -> nearest code.

    A point maps to the number of code midpoints strictly below it, all in fp32.
    """
    midpoints = 0.5 * (code[:-1] + code[1:])
    points = -1.0 + (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32)) / (_LUT_SIZE - 1)
    return torch.searchsorted(midpoints, points, right=False).to(torch.uint8)


_LUT_SIZE = 65536


def quantize_blockwise_8bit(values: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit codes of the dynamic map per block and each block's fp32 absmax.

    Follows bitsandbytes' CPU kernel (>= 0.49), not its 4-bit path: a value times the
    reciprocal of its block's absmax is snapped to one of 65536 grid points,
    trunc(((v + 1) * 0.5) * 65535 + 0.5), whose nearest code was tabulated beforehand.
    An all-zero block stores absmax 0 and code 0.
    """
    flat = values.reshape(-1).float()
    n = flat.numel()
    pad = (-n) % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=-1)  # padding zeros never raise an absmax
    inv = torch.where(absmax == 0, 0.0, 1.0 / absmax)
    normed = (blocks * inv.unsqueeze(1)).reshape(-1)[:n].clamp(-1.0, 1.0)
    point = (((normed + 1.0) * 0.5) * (_LUT_SIZE - 1) + 0.5).to(torch.int64)  # truncation
    codes = _lut_8bit(dynamic_map().to(flat.device))[point]
    zero_block = (absmax == 0).repeat_interleave(blocksize)[:n]
    return codes.masked_fill(zero_block, 0), absmax


def dequantize_blockwise_8bit(codes: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    return _scale_blocks(dynamic_map().to(codes.device)[codes.long()], absmax, blocksize)


def _scale_blocks(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    n = values.numel()
    full = n - n % blocksize
    body = (values[:full].reshape(-1, blocksize) * absmax[:full // blocksize, None]).reshape(-1)
    if full == n:
        return body
    return torch.cat([body, values[full:] * absmax[-1]])


@dataclass
class NF4Weight:
    """A weight in NF4: packed codes plus the absmax state (plain, or double-quantized)."""

    packed: torch.Tensor  # uint8 (ceil(numel / 2), 1): two codes per byte, first in the high nibble
    absmax: torch.Tensor  # fp32 (blocks,), or uint8 (blocks,) codes when double-quantized
    shape: tuple[int, ...]
    blocksize: int = 64
    # Double quantization: absmax = dynamic_map[absmax] * nested_absmax[block // 256] + offset
    nested_absmax: torch.Tensor | None = None  # fp32 (ceil(blocks / 256),)
    offset: float | None = None

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    def block_absmax(self) -> torch.Tensor:
        """The fp32 absmax of every block (decoded from the nested state if double-quantized)."""
        if self.nested_absmax is None:
            return self.absmax
        return dequantize_blockwise_8bit(self.absmax, self.nested_absmax, NESTED_BLOCKSIZE) + self.offset

    def nbytes(self) -> int:
        extra = 0 if self.nested_absmax is None else self.nested_absmax.numel() * 4 + 4
        return self.packed.numel() + self.absmax.numel() * self.absmax.element_size() + extra


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = False) -> NF4Weight:
    """NF4-quantize any float tensor exactly as `bitsandbytes.functional.quantize_4bit` does on CPU."""
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"NF4 blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    if not weight.is_floating_point():
        raise ValueError(f"NF4 quantizes float tensors, got {weight.dtype}")
    scaled, absmax = _blocks(weight.detach().reshape(-1).float(), blocksize)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    q = _nearest(scaled, NF4_CODE.to(scaled.device))
    packed = ((q[::2] << 4) | q[1::2]).unsqueeze(1)
    out = NF4Weight(packed, absmax, tuple(weight.shape), blocksize)
    if double_quant:
        offset = absmax.mean()
        out.absmax, out.nested_absmax = quantize_blockwise_8bit(absmax - offset)
        out.offset = float(offset)
    return out


def unpack_nf4_codes(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The 4-bit code indices (numel,) int64 of packed NF4 bytes."""
    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)
    return codes[:numel].long()


def dequantize_nf4(w: NF4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense tensor an NF4Weight stands for, computed in fp32 and cast to dtype."""
    numel = 1
    for s in w.shape:
        numel *= s
    values = NF4_CODE.to(w.packed.device)[unpack_nf4_codes(w.packed, numel)]
    return _scale_blocks(values, w.block_absmax(), w.blocksize).reshape(w.shape).to(dtype)
