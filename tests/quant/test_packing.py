"""Bit packing against transcriptions of AutoGPTQ's pack loop and AutoAWQ's interleaved order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ember.quant.packing import (AWQ_ORDER, pack_awq, pack_cols, pack_rows, unpack_awq, unpack_cols,
                                 unpack_rows)


def autogptq_pack(intweight: torch.Tensor, bits: int) -> torch.Tensor:
    """AutoGPTQ v1 `QuantLinear.pack` on (in, out) codes, written out as its loop does it."""
    iw = intweight.numpy().astype(np.uint32)
    q = np.zeros((iw.shape[0] // 32 * bits, iw.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < q.shape[0]:
        if bits in (2, 4, 8):
            for j in range(i, i + 32 // bits):
                q[row] |= iw[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        else:  # 3 bits: 10 codes, then one straddling two words
            for j in range(i, i + 10):
                q[row] |= iw[j] << (3 * (j - i))
            i += 10
            q[row] |= iw[i] << 30
            row += 1
            q[row] |= (iw[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                q[row] |= iw[j] << (3 * (j - i) + 1)
            i += 10
            q[row] |= iw[i] << 31
            row += 1
            q[row] |= (iw[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                q[row] |= iw[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    return torch.from_numpy(q.view(np.int32))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_packing_matches_autogptq(bits: int) -> None:
    codes = torch.randint(0, 2 ** bits, (96, 40))
    packed = pack_rows(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (96 * bits // 32, 40)
    assert torch.equal(packed, autogptq_pack(codes, bits))
    assert torch.equal(unpack_rows(packed, bits, 96), codes)
    zeros = torch.randint(0, 2 ** bits, (3, 96))
    assert torch.equal(unpack_cols(pack_cols(zeros, bits), bits, 96), zeros)
    assert torch.equal(pack_cols(zeros, bits), autogptq_pack(zeros.T, bits).T)


def test_awq_packing_matches_autoawq_order() -> None:
    codes = torch.randint(0, 16, (5, 24))
    expected = torch.zeros(5, 3, dtype=torch.int64)
    for col in range(3):
        for i in range(8):  # AutoAWQ: nibble i of word `col` holds channel col*8 + order_map[i]
            expected[:, col] |= codes[:, col * 8 + AWQ_ORDER[i]] << (4 * i)
    packed = pack_awq(codes)
    assert torch.equal(packed, torch.from_numpy(expected.numpy().astype(np.uint32).view(np.int32)))
    assert torch.equal(unpack_awq(packed), codes)


def test_codes_that_do_not_fill_words_are_refused() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_rows(torch.zeros(20, 4, dtype=torch.long), 3)
