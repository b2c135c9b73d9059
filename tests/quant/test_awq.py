"""AWQ: folded scales leave the float model unchanged, and the search beats plain rounding
when some input channels carry large activations."""

from __future__ import annotations

import torch

from ember.config import preset
from ember.model.transformer import Transformer
from ember.quant.awq import apply_scale, scale_groups
from ember.quant.calibration import BlockRunner
from ember.quant.quantize import QuantConfig, quantize_model


def salient_model(seed: int = 0) -> Transformer:
    """A tiny model whose norms amplify a few channels, as trained LLMs' activations do."""
    torch.manual_seed(seed)
    model = Transformer(preset("tiny", num_kv_heads=4)).eval()  # MHA: the v -> o group applies too
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[torch.randperm(64)[:4]] = 12.0
    return model


@torch.no_grad()
def test_folded_scales_preserve_the_float_block() -> None:
    model = salient_model()
    ids = torch.randint(0, 512, (2, 16))
    runner = BlockRunner(model, ids)
    layer = model.model.layers[0]
    before = runner.run(layer)
    modules = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for group in scale_groups(layer, "model.layers.0.", runner.cos_sin):
        assert len(group.linears) >= 1
        s = torch.rand(modules[group.linears[0]].in_features) + 0.5
        apply_scale(group, s, modules)
    assert len(scale_groups(layer, "model.layers.0.", runner.cos_sin)) == 4
    assert torch.allclose(runner.run(layer), before, atol=1e-4)


@torch.no_grad()
def test_awq_beats_rtn_on_salient_activations() -> None:
    ids = torch.randint(0, 512, (8, 32))
    ref = salient_model()
    target = ref(ids)
    errors = {}
    for method in ("rtn", "awq"):
        model = salient_model()
        quantize_model(model, QuantConfig(method=method, bits=4, group_size=64, awq_grid=10), ids)
        errors[method] = (model(ids) - target).pow(2).mean().item()
    assert errors["awq"] < 0.8 * errors["rtn"], errors
