"""GGUF weights kept as their blocks (load_model(..., keep_quantized=True)): the same model as
the dequantized load, at the file's size in memory, with the embedding and a tied head on one
set of blocks; other quantized types requantized to Q8_0 and said so."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import ember
from ember.adapters import LoRAConfig, apply_lora
from ember.quant.gguf_embedding import GGUFEmbedding
from ember.quant.gguf_linear import GGUFLinear
from tests.checkpoint.test_gguf_load import VOCAB, write_qwen2_gguf

gguf = pytest.importorskip("gguf")


def _model_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


@pytest.fixture(scope="module")
def smollm2_blocks(smollm2_file):
    return ember.load_model(smollm2_file, keep_quantized=True)


def test_smollm2_keeps_its_blocks(smollm2_blocks, smollm2, smollm2_file) -> None:
    m = smollm2_blocks
    layer = m.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, GGUFLinear) and layer.self_attn.q_proj.ggml_type == "Q4_1"
    assert isinstance(layer.mlp.down_proj, GGUFLinear)
    assert isinstance(m.model.embed_tokens, GGUFEmbedding) and m.model.embed_tokens.ggml_type == "Q8_0"
    assert isinstance(m.lm_head, GGUFLinear) and m.lm_head.blocks is m.model.embed_tokens.blocks
    # the file's bytes, not more: 98.4 MB on disk (its metadata included)
    assert _model_bytes(m) <= smollm2_file.stat().st_size
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, m.config.vocab_size, (2, 20), generator=g)
    with torch.inference_mode():
        kept, dense = m(ids), smollm2(ids)
    # same weights; only the order of fp32 additions differs
    assert ((kept - dense).abs().max() / dense.abs().max()).item() < 1e-4


def test_embedding_rows_are_the_dequantized_table(smollm2_blocks, smollm2) -> None:
    ids = torch.tensor([[0, 1, 49151, 300], [7, 7, 8, 9]])
    with torch.inference_mode():
        assert torch.equal(smollm2_blocks.model.embed_tokens(ids), smollm2.model.embed_tokens(ids))


def test_requantized_types_and_biases_and_untied_head(tmp_path, caplog) -> None:
    path = tmp_path / "tiny.gguf"
    write_qwen2_gguf(path)  # Q8_0, Q4_K, F16 and F32 tensors; q/k/v biases; an untied Q8_0 head
    dense = ember.load_model(path)
    with caplog.at_level(logging.INFO, logger="ember.checkpoint.gguf"):
        kept = ember.load_model(path, keep_quantized=True)
    assert "Q4_K requantized to Q8_0" in caplog.text and "Q8_0 kept" in caplog.text and "F16" in caplog.text
    attn = kept.model.layers[0].self_attn
    assert isinstance(attn.q_proj, GGUFLinear) and attn.q_proj.ggml_type == "Q8_0"  # was Q4_K
    assert attn.q_proj.bias is not None and torch.equal(attn.q_proj.bias, dense.model.layers[0].self_attn.q_proj.bias)
    assert isinstance(kept.model.layers[0].mlp.up_proj, nn.Linear)  # F16 in the file: stays dense
    assert isinstance(kept.lm_head, GGUFLinear) and kept.lm_head.blocks is not kept.model.embed_tokens.blocks
    # Q8_0 blocks kept exactly; Q4_K's values within half an 8-bit step of their block's range
    # (plus the rounding of the fp16 scale: up to 127 * 2^-11 of a step)
    assert torch.equal(kept.model.layers[0].self_attn.k_proj.dequantize(), dense.model.layers[0].self_attn.k_proj.weight)
    w = dense.model.layers[0].self_attn.q_proj.weight
    step = w.abs().reshape(w.shape[0], -1, 32).amax(-1, keepdim=True) / 127
    err = (attn.q_proj.dequantize() - w).abs().reshape(w.shape[0], -1, 32)
    assert bool((err <= step * 0.57 + 1e-7).all())
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.inference_mode():
        a, b = kept(ids), dense(ids)
    assert ((a - b).abs().max() / b.abs().max()).item() < 2e-2


def test_lora_trains_over_kept_blocks(tmp_path) -> None:
    """QLoRA-style: the blocks stay frozen, the adapter learns."""
    path = tmp_path / "tiny.gguf"
    write_qwen2_gguf(path)
    model = ember.load_model(path, keep_quantized=True)
    apply_lora(model, LoRAConfig(r=4, alpha=8, targets=("q_proj", "v_proj")))
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all("lora" in n for n, p in model.named_parameters() if p.requires_grad)
    ids = torch.randint(0, VOCAB, (2, 12))
    loss = model(ids).float().logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None for p in params)


def test_q4_0_export_keeps_its_size_in_memory(smollm2, smollm2_file, tmp_path) -> None:
    """The issue's memory bound: a 4-bit SmolLM2 with a quantized head in RAM within 1.15x of
    the Q4_0 GGUF (the one `ember export --type q4_0` writes, which llama.cpp runs)."""
    from ember.quant.gguf import export_gguf

    out = tmp_path / "smollm2-q4_0.gguf"
    export_gguf(smollm2, ember.load_tokenizer(smollm2_file), out, "q4_0")
    model = ember.load_model(out, keep_quantized=True)
    assert model.model.layers[0].mlp.gate_proj.ggml_type == "Q4_0"
    assert _model_bytes(model) <= 1.15 * out.stat().st_size
