"""Cutting shards (no processes): balanced splits, GQA groups and replicated KV heads, the
refusals that name the problem, and quantized / LoRA layers sharded by whole rows and blocks."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from ember.adapters.lora import wrap_module
from ember.config import preset
from ember.model.transformer import Transformer
from ember.parallel import ParallelError
from ember.parallel.group import ParallelGroup
from ember.parallel.shard import head_ranges, part, shard_model, slice_linear


def _group(rank: int, tp: int, pp: int = 1) -> ParallelGroup:
    g = ParallelGroup(rank, tp * pp, torch.device("cpu"))
    g.tp = tp  # no process group: shard_model only registers the collectives' hooks
    return g


def test_balanced_parts_cover_everything_once() -> None:
    assert [part(9, 2, r, "heads") for r in range(2)] == [(0, 5), (5, 9)]
    assert [part(30, 4, r, "layers") for r in range(4)] == [(0, 8), (8, 16), (16, 23), (23, 30)]
    with pytest.raises(ParallelError, match=r"the vocabulary \(3\) cannot be split over 4 ranks"):
        part(3, 4, 0, "the vocabulary")


def test_head_ranges_keep_gqa_groups_or_replicate_kv_heads() -> None:
    # SmolLM2: 9 query heads reading 3 KV heads, over 2 ranks: whole groups, 6 + 3 query heads.
    assert [head_ranges(r, 2, 9, 3) for r in range(2)] == [(0, 6, 0, 2), (6, 9, 2, 3)]
    # One KV head (MQA) over 2 ranks: the query heads split, the KV head on both.
    assert [head_ranges(r, 2, 4, 1) for r in range(2)] == [(0, 2, 0, 1), (2, 4, 0, 1)]
    with pytest.raises(ParallelError, match="multiple of the KV heads"):
        head_ranges(0, 4, 6, 3)


def test_shard_model_slices_heads_and_config() -> None:
    cfg = preset("tiny").replace(num_heads=4, num_kv_heads=2)
    model = Transformer(cfg)
    hd = cfg.d_head
    q = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    shard_model(model, _group(1, 2))
    attn = model.model.layers[0].self_attn
    assert torch.equal(attn.q_proj.weight, q[2 * hd:4 * hd])
    assert (attn.spec.num_heads, attn.spec.num_kv_heads, attn.spec.head_offset) == (2, 1, 2)
    assert attn.o_proj.in_features == 2 * hd
    assert (model.config.num_heads, model.config.n_kv_heads, model.config.d_head) == (2, 1, hd)
    assert model.lm_head.out_features == cfg.vocab_size - cfg.vocab_size // 2


def test_gguf_row_split_must_fall_on_block_boundaries() -> None:
    from ember.quant.gguf_linear import GGUFLinear

    torch.manual_seed(0)
    layer = GGUFLinear.from_linear(nn.Linear(96, 8), "Q8_0")
    with pytest.raises(ParallelError, match=r"down: its Q8_0 blocks hold 32 inputs each.*columns 0\.\.48"):
        slice_linear(layer, 0, 48, 1, "down")


@pytest.mark.parametrize("ggml_type", ["Q8_0", "Q4_0", "Q4_1"])
def test_gguf_shards_compute_the_whole_layer(ggml_type: str) -> None:
    """Output rows and 32-column input blocks of packed GGUF weights: the shards' products
    concatenated / summed are the whole layer's."""
    import copy

    from ember.quant.gguf_linear import GGUFLinear

    torch.manual_seed(0)
    whole = GGUFLinear.from_linear(nn.Linear(128, 64), ggml_type)
    x = torch.randn(3, 128)
    want = whole(x)
    cols = [copy.deepcopy(whole) for _ in range(2)]
    rows = [copy.deepcopy(whole) for _ in range(2)]
    for r in range(2):
        slice_linear(cols[r], 32 * r, 32 * (r + 1), 0, "w")
        slice_linear(rows[r], 64 * r, 64 * (r + 1), 1, "w")
    rows[1].bias = None  # the row-parallel bias is added once (rank 0)
    torch.testing.assert_close(torch.cat([m(x) for m in cols], -1), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rows[0](x[:, :64]) + rows[1](x[:, 64:]), want, atol=1e-4, rtol=1e-4)


def test_int8_shards_compute_the_whole_layer() -> None:
    import copy

    from ember.quant.linear import Int8Linear

    torch.manual_seed(0)
    whole = Int8Linear.from_linear(nn.Linear(96, 40))
    x = torch.randn(3, 96)
    want = whole(x)
    cols, rows = [copy.deepcopy(whole) for _ in range(2)], [copy.deepcopy(whole) for _ in range(2)]
    for r in range(2):
        slice_linear(cols[r], 20 * r, 20 * (r + 1), 0, "w")
        slice_linear(rows[r], 48 * r, 48 * (r + 1), 1, "w")
    rows[1].bias = None
    torch.testing.assert_close(torch.cat([m(x) for m in cols], -1), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rows[0](x[:, :48]) + rows[1](x[:, 48:]), want, atol=1e-4, rtol=1e-4)


def test_lora_wrapped_layers_shard_base_and_adapter() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12, bias=True))
    lora = wrap_module(model, "0", r=4, alpha=8)
    nn.init.normal_(lora.lora_B.weight)
    x = torch.randn(2, 16)
    want = lora(x)
    import copy

    halves = [copy.deepcopy(lora) for _ in range(2)]
    for r, h in enumerate(halves):
        slice_linear(h, 6 * r, 6 * (r + 1), 0, "0")
    torch.testing.assert_close(torch.cat([h(x) for h in halves], -1), want)
    halves = [copy.deepcopy(lora) for _ in range(2)]
    for r, h in enumerate(halves):
        slice_linear(h, 8 * r, 8 * (r + 1), 1, "0")
    halves[1].base_layer.bias = None  # the row-parallel bias is added once (rank 0)
    torch.testing.assert_close(halves[0](x[:, :8]) + halves[1](x[:, 8:]), want)


def test_unsupported_layers_are_named() -> None:
    with pytest.raises(ParallelError, match=r"model.layers.0.mlp.up_proj: tensor parallel splits .*not Conv1d"):
        slice_linear(nn.Conv1d(2, 2, 1), 0, 1, 0, "model.layers.0.mlp.up_proj")


def test_pipeline_stage_keeps_its_layers_renumbered() -> None:
    cfg = preset("tiny").replace(num_layers=5)
    model = Transformer(cfg)
    last = model.model.layers[4]
    shard_model(model, _group(1, 1, pp=2))
    assert model.config.num_layers == 2 and list(model.model.layers)[-1] is last
    assert [b.self_attn.spec.layer_idx for b in model.model.layers] == [0, 1]
    assert isinstance(model.model.embed_tokens, nn.Identity)


def test_engine_config_names_bad_parallel_settings() -> None:
    from ember.engine.config import EngineConfig, EngineConfigError

    with pytest.raises(EngineConfigError, match="tensor_parallel_size must be >= 1, got 0"):
        EngineConfig(tensor_parallel_size=0)
    with pytest.raises(EngineConfigError, match="enable_expert_parallel .* set tensor_parallel_size > 1"):
        EngineConfig(enable_expert_parallel=True)
    assert EngineConfig(tensor_parallel_size=2, pipeline_parallel_size=3).world_size == 6


def test_unsplittable_models_are_refused_before_any_process_starts() -> None:
    from ember.parallel.shard import check_splittable

    cfg = preset("tiny").replace(num_heads=4, num_kv_heads=2, num_layers=2)
    check_splittable(cfg, 2, 2, False)
    with pytest.raises(ParallelError, match=r"the model's layers \(2\) cannot be split over 3 ranks"):
        check_splittable(cfg, 1, 3, False)
    with pytest.raises(ParallelError, match="multiple of the KV heads"):
        check_splittable(cfg, 3, 1, False)
