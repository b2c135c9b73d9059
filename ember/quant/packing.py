"""Bit packing of integer codes into int32 words: the AutoGPTQ v1 and AutoAWQ GEMM layouts.

AutoGPTQ packs codes as a little-endian bit stream along one dimension: code i of a column
occupies bits [i * bits, (i + 1) * bits) of the concatenated 32-bit words, so a 3-bit code may
straddle two words (32 codes fill 3 words). Its tensors, for a Linear (out, in):

    qweight  int32 (in * bits / 32, out)       codes packed along the input dimension
    qzeros   int32 (groups, out * bits / 32)   zero points minus one, packed along the output
    scales   fp16  (groups, out)               g_idx int32 (in,): group of each input column

AutoAWQ's GEMM layout keeps (in, out) orientation and packs eight 4-bit codes of neighbouring
output channels per word in the interleaved order 0, 2, 4, 6, 1, 3, 5, 7 (nibble k holds
channel AWQ_ORDER[k]); qzeros uses the same packing with no offset:

    qweight  int32 (in, out / 8)    qzeros int32 (groups, out / 8)    scales fp16 (groups, out)
"""

from __future__ import annotations

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit values held in int64 -> the int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def packed_length(n: int, bits: int) -> int:
    if (n * bits) % 32:
        raise ValueError(f"{n} codes of {bits} bits do not fill whole 32-bit words "
                         f"(need a multiple of {32 // _gcd(bits, 32)})")
    return n * bits // 32


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes (n, m) along dim 0 into int32 (n * bits / 32, m) as a little-endian bit stream."""
    n, m = codes.shape
    words = packed_length(n, bits)
    c = codes.to(torch.int64)
    if 32 % bits == 0:
        per = 32 // bits
        shifts = (torch.arange(per, device=c.device) * bits).view(1, per, 1)
        return _to_int32((c.view(words, per, m) << shifts).sum(dim=1))
    out = torch.zeros(words + 1, m, dtype=torch.int64, device=c.device)
    offset = torch.arange(n, device=c.device) * bits
    word, shift = offset // 32, (offset % 32).view(-1, 1)
    out.index_add_(0, word, (c << shift) & 0xFFFFFFFF)
    spill = (c >> (32 - shift)) * (shift + bits > 32)  # the high bits that cross into the next word
    out.index_add_(0, word + 1, spill)
    return _to_int32(out[:words])


def unpack_rows(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_rows: int64 codes (n, m) from int32 (n * bits / 32, m)."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    mask = 2 ** bits - 1
    if 32 % bits == 0:
        per = 32 // bits
        shifts = (torch.arange(per, device=packed.device) * bits).view(1, per, 1)
        return ((words.unsqueeze(1) >> shifts) & mask).reshape(-1, words.shape[1])[:n]
    words = torch.cat([words, torch.zeros_like(words[:1])])
    offset = torch.arange(n, device=packed.device) * bits
    word, shift = offset // 32, (offset % 32).view(-1, 1)
    low = words[word] >> shift
    high = (words[word + 1] << (32 - shift)) * (shift + bits > 32)
    return (low | high) & mask


def pack_cols(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes (m, n) along dim 1 (AutoGPTQ's qzeros)."""
    return pack_rows(codes.T, bits).T.contiguous()


def unpack_cols(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    return unpack_rows(packed.T, bits, n).T


def pack_awq(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes (rows, out) -> int32 (rows, out / 8) in AutoAWQ's interleaved order."""
    rows, cols = codes.shape
    packed_length(cols, 4)
    c = codes.to(torch.int64).view(rows, cols // 8, 8)[..., list(AWQ_ORDER)]
    shifts = torch.arange(8, device=codes.device) * 4
    return _to_int32((c << shifts).sum(dim=-1))


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """int32 (rows, out / 8) in AutoAWQ's order -> int64 codes (rows, out)."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(8, device=packed.device) * 4
    nibbles = (words.unsqueeze(-1) >> shifts) & 0xF  # (rows, out/8, 8): nibble k = channel AWQ_ORDER[k]
    inverse = [AWQ_ORDER.index(ch) for ch in range(8)]
    return nibbles[..., inverse].reshape(packed.shape[0], -1)
