"""INT8: the codes and row scales of bitsandbytes' LLM.int8 layout, and the fused CPU matmul."""

from __future__ import annotations

import pytest
import torch

from ember.quant.int8 import has_int8_kernel, int8_matmul, quantize_int8
from ember.quant.linear import Int8Linear


def test_codes_equal_bitsandbytes_vectorwise_quant() -> None:
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(96, 200) * 0.05
    w[3] = 0.0  # an all-zero row must not produce NaNs
    q, absmax = quantize_int8(w)
    ref_q, ref_absmax, _ = bnb_f.int8_vectorwise_quant(w.clone())
    assert torch.equal(q, ref_q)
    assert torch.equal(absmax, ref_absmax)
    assert not q[3].any()


def test_fused_and_dequantized_paths_agree() -> None:
    lin = torch.nn.Linear(256, 384, bias=True)
    m = Int8Linear.from_linear(lin)
    x = torch.randn(2, 7, 256)
    exact = torch.nn.functional.linear(x, m.dequantize(), m.bias)
    with torch.no_grad():
        fast = m(x)
    assert fast.shape == exact.shape
    # The fused CPU kernel rounds activations and outputs to bf16: ~0.4 % relative.
    assert (fast - exact).norm() / exact.norm() < 1e-2
    # With a gradient to compute, the dequantized path runs (and is exact).
    xg = x.clone().requires_grad_(True)
    y = m(xg)
    assert torch.allclose(y, exact, atol=1e-5)
    y.sum().backward()
    assert xg.grad is not None and m.bias.grad is None


@pytest.mark.skipif(not has_int8_kernel(torch.device("cpu")), reason="no fused int8 CPU kernel in this torch")
def test_unaligned_weights_do_not_reach_the_kernel() -> None:
    # Tensors read from safetensors files can start at any byte; PyTorch's kernel needs 64.
    buf = torch.randint(-127, 127, (64 * 64 + 8,), dtype=torch.int8)
    q = buf[8:].view(64, 64)
    assert q.data_ptr() % 64
    absmax = torch.ones(64) * 127
    x = torch.randn(3, 64)
    with torch.inference_mode():
        y = int8_matmul(x, q, absmax)
    assert torch.allclose(y, x @ q.float().T, atol=1e-4)
    m = Int8Linear(64, 64)
    m.weight, m.SCB = q, absmax
    with torch.inference_mode():
        assert (m(x) - x @ q.float().T).abs().max() < 0.05 * (x @ q.float().T).abs().max()
    assert m.weight.data_ptr() % 64 == 0
