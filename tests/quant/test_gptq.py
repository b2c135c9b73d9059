"""GPTQ on one linear layer: it must beat round-to-nearest on the method's own objective,
the layer's output error on the calibration inputs."""

from __future__ import annotations

import pytest
import torch

from ember.quant.gptq import HessianAccumulator, gptq_quantize, sequential_groups
from ember.quant.rtn import rtn_quantize


def calibration_inputs(n: int = 2048, d: int = 128) -> torch.Tensor:
    # Correlated features with uneven scales, as real activations have.
    mix = torch.randn(d, d) / d ** 0.5
    scales = torch.exp(torch.randn(d))
    return (torch.randn(n, d) @ mix + 0.1 * torch.randn(n, d)) * scales


def output_error(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> float:
    return ((x @ w.T - x @ q.T) ** 2).mean().item()


def test_hessian_accumulates_in_chunks() -> None:
    x = torch.randn(300, 16, dtype=torch.float64)
    acc = HessianAccumulator(16, torch.device("cpu"))
    for chunk in x.split(70):
        acc.add(chunk.view(1, -1, 16))
    assert torch.allclose(acc.H, 2 * x.T @ x / 300)


@pytest.mark.parametrize("bits, group_size, act_order", [(4, 32, False), (4, 32, True), (3, -1, False), (3, 32, True)])
def test_gptq_lowers_layer_output_error_versus_rtn(bits: int, group_size: int, act_order: bool) -> None:
    x = calibration_inputs()
    w = torch.randn(64, 128) * 0.05
    acc = HessianAccumulator(128, torch.device("cpu"))
    acc.add(x)
    gq = gptq_quantize(w, acc.H, bits, group_size, act_order=act_order)
    rtn = rtn_quantize(w, bits, group_size)
    assert gq.codes.dtype == torch.uint8 and int(gq.codes.max()) < 2 ** bits
    if act_order:  # groups follow the Hessian order, so g_idx is not monotone
        assert not torch.equal(gq.g_idx.sort().values, gq.g_idx)
    err_gptq = output_error(x, w, gq.dequantize())
    err_rtn = output_error(x, w, rtn.dequantize())
    assert err_gptq < 0.8 * err_rtn, (err_gptq, err_rtn)


def test_dead_inputs_get_zero_weight_and_no_nan() -> None:
    x = calibration_inputs(512, 64)
    x[:, 5] = 0.0
    acc = HessianAccumulator(64, torch.device("cpu"))
    acc.add(x)
    gq = gptq_quantize(torch.randn(32, 64), acc.H, 4, 32)
    w = gq.dequantize()
    assert torch.isfinite(w).all()


def test_true_sequential_order() -> None:
    names = {f"model.layers.0.{n}": None for n in ("mlp.down_proj", "self_attn.o_proj", "mlp.up_proj",
                                                      "self_attn.q_proj", "mlp.gate_proj", "self_attn.k_proj",
                                                      "self_attn.v_proj")}
    groups = [[n.rsplit(".", 1)[-1] for n in g] for g in sequential_groups(names)]
    assert groups == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["up_proj", "gate_proj"], ["down_proj"]]
