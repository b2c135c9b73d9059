"""LoRA by module swap: PEFT's init and scaling, trainable set, targets, merge, disable, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from ember.adapters.lora import (LoRAConfig, LoRAError, LoRALinear, adapters_disabled, apply_lora,
                                 lora_layers, merge_and_unload, merge_lora, parameter_counts,
                                 parse_targets, trainable_summary, unmerge_lora)
from ember.config import preset
from ember.model.transformer import Transformer

IDS = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(3))


def _tiny(**overrides) -> Transformer:
    return Transformer(preset("tiny", **overrides)).eval()


def _randomize(model: nn.Module) -> None:
    """Give B a non-zero value so the adapter changes the output (B starts at zero)."""
    for _, layer in lora_layers(model):
        nn.init.normal_(layer.lora_B.weight, std=0.5)


def test_init_matches_peft_and_starts_at_the_base_model() -> None:
    model = _tiny()
    with torch.no_grad():
        base = model(IDS)
    names = apply_lora(model, LoRAConfig(r=4, alpha=8))
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoRALinear) and layer.scaling == 2.0
    # kaiming_uniform(a=sqrt(5)) on (r, in) is U(-1/sqrt(in), 1/sqrt(in)), nn.Linear's default.
    bound = 1 / math.sqrt(64)
    a = layer.lora_A.weight
    assert a.shape == (4, 64) and a.abs().max() <= bound and a.std() > 0.4 * bound
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    with torch.no_grad():
        assert torch.equal(model(IDS), base)


def test_rslora_scaling() -> None:
    assert LoRAConfig(r=16, alpha=8).scaling == 0.5
    assert LoRAConfig(r=16, alpha=8, rslora=True).scaling == 2.0


def test_only_adapters_train() -> None:
    model = _tiny()
    apply_lora(model, LoRAConfig(r=2, targets="all-linear"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    model.train()
    model(IDS).logsumexp(-1).mean().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == trainable


@pytest.mark.parametrize("targets, rank", [(("q_proj", "v_proj"), 8), ("all-linear", 16)])
def test_trainable_fraction_under_one_percent_at_llama_3_8b(targets, rank) -> None:
    with torch.device("meta"):
        model = Transformer(preset("llama-3-8b"))
    apply_lora(model, LoRAConfig(r=rank, targets=targets))
    trainable, total = parameter_counts(model)
    base = preset("llama-3-8b").num_params()
    per_layer_dims = {("q_proj", "v_proj"): (4096 + 4096) + (4096 + 1024),
                      "all-linear": 2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336)}
    assert trainable == 32 * rank * per_layer_dims[targets]
    assert total == base + trainable
    assert trainable / total < 0.01
    summary = trainable_summary(model)
    assert summary == (f"trainable params: {trainable:,} || all params: {total:,} || "
                       f"trainable%: {100 * trainable / total:.4f}")


def test_targets_by_suffix_regex_and_all_linear() -> None:
    model = _tiny(tie_word_embeddings=False)
    names = apply_lora(model, LoRAConfig(targets=("self_attn.o_proj", "down_proj")))
    assert sorted(names) == sorted(f"model.layers.{i}.{m}" for i in range(2)
                                   for m in ("self_attn.o_proj", "mlp.down_proj"))
    names = apply_lora(_tiny(), LoRAConfig(targets=r"model\.layers\.1\..*_proj"))
    assert len(names) == 7 and all(n.startswith("model.layers.1.") for n in names)
    names = apply_lora(_tiny(tie_word_embeddings=False), LoRAConfig(targets="all-linear"))
    assert len(names) == 14 and "lm_head" not in names
    moe = apply_lora(Transformer(preset("tiny-moe")), LoRAConfig(targets=("w1", "w3")))
    assert len(moe) == 2 * 4 * 2  # layers x experts x (w1, w3)
    assert parse_targets(["q_proj", "v_proj"]) == ("q_proj", "v_proj")
    assert parse_targets(["all-linear"]) == "all-linear"
    assert parse_targets([r".*layers\.0\..*"]) == r".*layers\.0\..*"


@pytest.mark.parametrize("cfg, needle", [
    (LoRAConfig(targets=("qkv",)), "match no module.*q_proj"),
    (LoRAConfig(targets=("self_attn",)), "is a Attention, not a linear layer"),
    (LoRAConfig(targets=("lm_head",)), "tied"),
    (LoRAConfig(targets="(unclosed"), "not a valid regular expression"),
])
def test_bad_targets_are_clear_errors(cfg: LoRAConfig, needle: str) -> None:
    with pytest.raises(LoRAError, match=needle):
        apply_lora(_tiny(), cfg)


def test_bad_config_and_double_apply() -> None:
    with pytest.raises(LoRAError, match="rank r must be positive"):
        LoRAConfig(r=0)
    with pytest.raises(LoRAError, match="dropout"):
        LoRAConfig(dropout=1.0)
    model = _tiny()
    apply_lora(model, LoRAConfig())
    with pytest.raises(LoRAError, match="already has LoRA"):
        apply_lora(model, LoRAConfig())


@torch.no_grad()
def test_merge_unmerge_and_unload_keep_outputs() -> None:
    model = _tiny()
    base = model(IDS)
    w0 = model.model.layers[0].mlp.up_proj.weight.clone()
    apply_lora(model, LoRAConfig(r=4, alpha=16, targets="all-linear"))
    _randomize(model)
    unmerged = model(IDS)
    assert (unmerged - base).abs().max() > 1e-2  # the adapter matters, so equality below means something
    merge_lora(model)
    assert not torch.equal(model.model.layers[0].mlp.up_proj.base_layer.weight, w0)
    assert (model(IDS) - unmerged).abs().max() < 1e-5
    unmerge_lora(model)
    assert (model.model.layers[0].mlp.up_proj.base_layer.weight - w0).abs().max() < 1e-6
    assert (model(IDS) - unmerged).abs().max() < 1e-5
    merge_and_unload(model)
    assert not list(lora_layers(model)) and isinstance(model.model.layers[0].mlp.up_proj, nn.Linear)
    assert (model(IDS) - unmerged).abs().max() < 1e-5


@torch.no_grad()
def test_adapters_disabled_is_the_base_model() -> None:
    model = _tiny()
    base = model(IDS)
    apply_lora(model, LoRAConfig(r=4, targets="all-linear"))
    _randomize(model)
    tuned = model(IDS)
    with adapters_disabled(model):
        assert torch.equal(model(IDS), base)
    assert torch.equal(model(IDS), tuned)
    merge_lora(model)  # a merged model is unmerged for the duration and merged again after
    with adapters_disabled(model):
        assert (model(IDS) - base).abs().max() < 1e-5
    assert all(layer.merged for _, layer in lora_layers(model))
    assert (model(IDS) - tuned).abs().max() < 1e-5


def test_dropout_applies_to_the_adapter_input_in_training_only() -> None:
    model = _tiny()
    apply_lora(model, LoRAConfig(r=4, dropout=0.5))
    _randomize(model)
    with torch.no_grad():
        assert torch.equal(model(IDS), model(IDS))
        model.train()
        assert not torch.equal(model(IDS), model(IDS))


class _Int8Linear(nn.Module):
    """A stand-in quantized linear: int8 weight buffer with per-row scales, no float weight."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        scale = linear.weight.abs().amax(1, keepdim=True) / 127
        self.register_buffer("qweight", torch.round(linear.weight / scale).to(torch.int8))
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ (self.qweight.float() * self.scale).t()


def test_lora_wraps_a_quantized_linear_but_refuses_to_merge_into_it() -> None:
    base = _Int8Linear(nn.Linear(64, 32))
    layer = LoRALinear(base, r=4, alpha=8)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 64)
    expected = base(x) + x @ layer.delta_weight().t()
    assert (layer(x) - expected).abs().max() < 1e-5
    layer(x).sum().backward()
    assert layer.lora_A.weight.grad is not None
    with pytest.raises(LoRAError, match="cannot merge"):
        layer.merge()
    assert parameter_counts(layer) == (4 * 64 + 32 * 4, 4 * 64 + 32 * 4 + 64 * 32)  # packed weight counted


def test_adapters_stay_float32_on_a_bfloat16_base() -> None:
    model = _tiny().to(torch.bfloat16)
    apply_lora(model, LoRAConfig())
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_A.weight.dtype == torch.float32
    assert model(IDS).dtype == torch.bfloat16
