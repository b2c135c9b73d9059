"""AWQ: folded scales leave the float model unchanged, and the search beats plain rounding
when some input channels carry large activations."""

from __future__ import annotations

import pytest
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
    for group in scale_groups(layer, "model.layers.0.", runner.cos_sin(layer)):
        assert len(group.linears) >= 1
        s = torch.rand(modules[group.linears[0]].in_features) + 0.5
        apply_scale(group, s, modules)
    assert len(scale_groups(layer, "model.layers.0.", runner.cos_sin(layer))) == 4
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


# Falcon's and Gemma 3's blocks (tiny random models made by transformers): which groups each has.
FAMILY_GROUPS = {
    "falcon-mqa-parallel": 1,   # one LayerNorm feeds q, k, v and up together; MQA: no v -> o; GELU: no up -> down
    "falcon-new-arch-gqa": 2,   # ln_attn -> q, k, v; ln_mlp -> up (biased LayerNorms and linears)
    "falcon-rw-alibi": 3,       # sequential, multi-head: + v -> o
    "gemma3-interleaved": 3,    # (1 + w) norms: input -> q, k, v; pre-feedforward -> gate, up; up -> down
}


def _family_model(family: str, tmp_path, salient: bool = False) -> Transformer:
    import ember
    from tests.hf_models import make_hf_model

    make_hf_model(family, tmp_path)
    model = ember.load_model(tmp_path)
    if salient:  # a few channels amplified by every norm that feeds linears, as in trained models
        with torch.no_grad():
            for layer in model.model.layers:
                for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm"):
                    norm = layer._modules.get(name)
                    if norm is not None and not (layer.sandwich and name == "post_attention_layernorm"):
                        norm.weight[torch.randperm(64, generator=torch.Generator().manual_seed(3))[:4]] = 12.0
    return model


@torch.no_grad()
@pytest.mark.parametrize("family", sorted(FAMILY_GROUPS))
def test_folded_scales_preserve_falcon_and_gemma_blocks(family, tmp_path) -> None:
    model = _family_model(family, tmp_path)
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    runner = BlockRunner(model, ids)
    modules = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for idx, layer in enumerate(model.model.layers):
        before = runner.run(layer)
        groups = scale_groups(layer, f"model.layers.{idx}.", runner.cos_sin(layer))
        assert len(groups) == FAMILY_GROUPS[family]
        for group in groups:
            s = torch.rand(modules[group.linears[0]].in_features) + 0.5
            apply_scale(group, s, modules)
        after = runner.run(layer)
        assert (after - before).abs().max().item() < 1e-4 * max(1.0, before.abs().max().item())
        runner.advance(layer)
    assert (model(ids) - _family_model(family, tmp_path / "fresh")(ids)).abs().max().item() < 1e-3


@torch.no_grad()
@pytest.mark.parametrize("family", ["falcon-mqa-parallel", "gemma3-interleaved"])
def test_awq_beats_rtn_on_falcon_and_gemma(family, tmp_path) -> None:
    ids = torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(1))
    target = _family_model(family, tmp_path / "ref", salient=True)(ids)
    errors = {}
    for method in ("rtn", "awq"):
        model = _family_model(family, tmp_path / method, salient=True)
        quantize_model(model, QuantConfig(method=method, bits=4, group_size=32, awq_grid=10), ids)
        errors[method] = (model(ids) - target).pow(2).mean().item()
    assert errors["awq"] < 0.8 * errors["rtn"], errors
