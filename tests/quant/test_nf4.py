"""NF4 against bitsandbytes on CPU: packed bytes, absmax and double-quantized state, bit for bit."""

from __future__ import annotations

import pytest
import torch

from ember.quant.linear import NF4Linear
from ember.quant.nf4 import NF4_CODE, dequantize_nf4, dynamic_map, quantize_nf4

bnb_f = pytest.importorskip("bitsandbytes.functional")

SHAPES = [(64, 64), (96, 33), (7, 9), (256, 1000), (1, 1), (3, 4096)]


def test_code_tables_are_bitsandbytes() -> None:
    assert torch.equal(NF4_CODE, bnb_f.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_map(), bnb_f.create_dynamic_map())


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bytes_and_state_equal_bitsandbytes(double_quant: bool, dtype: torch.dtype) -> None:
    for i, shape in enumerate(SHAPES):
        w = (torch.randn(*shape) * 10 ** (i % 4 - 2)).to(dtype)
        packed, state = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
        ours = quantize_nf4(w, 64, double_quant)
        assert torch.equal(ours.packed, packed), shape
        assert torch.equal(ours.absmax, state.absmax), shape
        if double_quant:
            assert torch.equal(ours.nested_absmax, state.state2.absmax), shape
            assert ours.offset == state.offset.item()
        else:
            assert ours.nested_absmax is None and state.state2 is None
        assert torch.equal(dequantize_nf4(ours, dtype), bnb_f.dequantize_4bit(packed, state)), shape


def test_double_quantization_cuts_the_constants_fourfold() -> None:
    w = torch.randn(512, 512)
    plain, dq = quantize_nf4(w), quantize_nf4(w, double_quant=True)
    n = w.numel()
    assert plain.nbytes() * 8 / n == pytest.approx(4 + 32 / 64)
    assert dq.nbytes() * 8 / n < 4 + 0.13
    # Double quantization only perturbs the scales a little.
    err_plain = (dequantize_nf4(plain) - w).pow(2).mean()
    err_dq = (dequantize_nf4(dq) - w).pow(2).mean()
    assert err_dq < 1.05 * err_plain


def test_nf4_linear_is_a_frozen_differentiable_base() -> None:
    lin = torch.nn.Linear(128, 64, bias=True)
    base = NF4Linear.from_linear(lin, double_quant=True)
    assert not any(p.requires_grad for p in base.parameters())
    x = torch.randn(3, 5, 128, requires_grad=True)
    y = base(x)
    assert y.shape == (3, 5, 64)
    y.square().sum().backward()
    # d/dx of (x W^T + b)^2 summed: 2 (x W^T + b) W with the dequantized W.
    w = base.dequantize()
    expected = 2 * (x.detach() @ w.T + lin.bias.detach()) @ w
    assert torch.allclose(x.grad, expected, atol=1e-4)
    rel = (w - lin.weight).norm() / lin.weight.norm()
    assert rel < 0.15  # NF4 is ~4 bits: close to, not equal to, the float weight
