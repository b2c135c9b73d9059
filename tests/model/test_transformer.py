"""Model behaviour that parity tests do not cover: MoE aux loss, ALiBi, windows, presets."""

from __future__ import annotations

import pytest
import torch

from ember.config import PRESETS, ConfigError, ModelConfig, preset
from ember.model.generate import generate
from ember.model.transformer import Transformer


def test_moe_aux_loss_matches_transformers() -> None:
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    model = Transformer(preset("tiny-moe"))
    ids = torch.randint(0, 512, (2, 12))
    _, router_logits = model.hidden(ids)
    _, ours = model(ids, return_aux_loss=True)
    ref = load_balancing_loss_func(tuple(router_logits), 4, 2)
    assert torch.allclose(ours, ref, atol=1e-6)
    ours.backward()  # trainable: gradients reach the router
    assert model.model.layers[0].block_sparse_moe.gate.weight.grad is not None


def test_dense_model_aux_loss_is_zero() -> None:
    _, aux = Transformer(preset("tiny"))(torch.randint(0, 512, (1, 4)), return_aux_loss=True)
    assert aux.item() == 0.0


@pytest.mark.parametrize("changes", [dict(position="alibi"), dict(sliding_window=5),
                                     dict(position="alibi", sliding_window=5),
                                     dict(sliding_window=5, sliding_window_start_layer=1)])
@torch.no_grad()
def test_cached_decode_equals_full_forward(changes) -> None:
    """The KV-cache path and dense causal attention agree for every masking variant."""
    model = Transformer(preset("tiny").replace(**changes)).eval()
    prompt = torch.randint(0, 512, (2, 7))
    out = generate(model, prompt, max_new_tokens=12)
    full = model(out)[:, prompt.shape[1] - 1:-1].argmax(-1)
    assert torch.equal(full, out[:, prompt.shape[1]:])


def test_sliding_window_limits_context() -> None:
    model = Transformer(preset("tiny").replace(sliding_window=4, num_layers=1)).eval()
    a = torch.randint(0, 512, (1, 10))
    b = a.clone()
    b[0, 0] = (a[0, 0] + 1) % 512  # differs only outside the last token's window
    with torch.no_grad():
        assert torch.allclose(model(a)[0, -1], model(b)[0, -1])
        assert not torch.allclose(model(a)[0, 3], model(b)[0, 3])


def test_presets_have_the_advertised_sizes() -> None:
    assert 8e6 < preset("quickstart-10m").num_params() < 12e6
    assert 40e6 < preset("bench-50m").num_params() < 60e6
    assert 7.9e9 < preset("llama-3-8b").num_params() < 8.1e9
    assert 46e9 < preset("mixtral-8x7b").num_params() < 47.5e9
    assert 12.5e9 < preset("mixtral-8x7b").num_params(active=True) < 13.5e9
    for name, cfg in PRESETS.items():
        assert cfg.flops_per_token(2048) > 6 * cfg.num_params(non_embedding=True, active=True), name


def test_invalid_config_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="multiple of num_kv_heads"):
        ModelConfig(vocab_size=10, hidden_size=64, intermediate_size=8, num_layers=1, num_heads=4, num_kv_heads=3)
    with pytest.raises(ConfigError, match="unknown model preset"):
        preset("gpt-5")
