"""--quantize-head: the embedding and LM head in Q8_0 blocks in memory, saved in floating point
and quantized again on load to the same blocks; GGUF-block models refuse safetensors saves."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import ember
from ember.checkpoint.hf import CheckpointError
from ember.config import preset
from ember.model.transformer import Transformer
from ember.quant.gguf_embedding import GGUFEmbedding
from ember.quant.gguf_linear import GGUFLinear
from ember.quant.head import HeadQuantizationError, quantize_head
from ember.quant.linear import weight_bytes
from ember.quant.quantize import QuantConfig, quantize_model
from tests.checkpoint.test_gguf_load import write_qwen2_gguf

pytest.importorskip("gguf")


def _model(tied: bool = True, hidden: int | None = None) -> Transformer:
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=512)
    cfg = dataclasses.replace(cfg, tie_word_embeddings=tied, **({"hidden_size": hidden} if hidden else {}))
    return Transformer(cfg).eval()


@pytest.mark.parametrize("tied", [True, False])
def test_head_in_q8_0_saves_and_reloads_to_the_same_blocks(tied, tmp_path) -> None:
    model = _model(tied)
    ids = torch.randint(0, 512, (2, 16))
    with torch.inference_mode():
        ref = model(ids)
    body_only = weight_bytes(quantize_model(_model(tied), QuantConfig(method="int8")))
    quantize_model(model, QuantConfig(method="int8", quantize_head=True))
    assert isinstance(model.model.embed_tokens, GGUFEmbedding) and isinstance(model.lm_head, GGUFLinear)
    assert (model.lm_head.blocks is model.model.embed_tokens.blocks) == tied
    assert weight_bytes(model) < body_only
    with torch.inference_mode():
        out = model(ids)
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 0.05  # 8-bit everything
    ember.save_model(model, tmp_path)
    assert ember.load_model(tmp_path).quantization_config["ember_quantized_head"] == "Q8_0"
    reloaded = ember.load_model(tmp_path)
    assert torch.equal(reloaded.lm_head.blocks, model.lm_head.blocks)
    assert torch.equal(reloaded.model.embed_tokens.blocks, model.model.embed_tokens.blocks)
    with torch.inference_mode():
        assert torch.equal(reloaded(ids), out)


def test_embedding_lookup_equals_the_dequantized_rows() -> None:
    model = _model()
    emb = GGUFEmbedding.from_embedding(model.model.embed_tokens, "Q8_0")
    ids = torch.tensor([[0, 511, 3], [3, 3, 7]])
    assert torch.equal(emb(ids), emb.dequantize()[ids])
    with pytest.raises(IndexError, match="out of range"):
        emb(torch.tensor([512]))


def test_hidden_not_a_multiple_of_32_is_one_clear_error() -> None:
    model = _model(hidden=48)
    with pytest.raises(HeadQuantizationError, match="multiple of 32"):
        quantize_head(model)


def test_bad_head_type_in_a_checkpoint(tmp_path) -> None:
    model = quantize_model(_model(), QuantConfig(method="int8", quantize_head=True))
    ember.save_model(model, tmp_path)
    cfg = (tmp_path / "config.json").read_text().replace('"ember_quantized_head": "Q8_0"',
                                                         '"ember_quantized_head": "Q2_K"')
    (tmp_path / "config.json").write_text(cfg)
    with pytest.raises(CheckpointError, match="ember_quantized_head is 'Q2_K'"):
        ember.load_model(tmp_path)


def test_gguf_blocks_refuse_a_safetensors_save_but_export(tmp_path) -> None:
    path = tmp_path / "tiny.gguf"
    write_qwen2_gguf(path)
    kept = ember.load_model(path, keep_quantized=True)
    with pytest.raises(CheckpointError, match="ember export --format gguf"):
        ember.save_model(kept, tmp_path / "out")
    assert not (tmp_path / "out" / "config.json").exists()
    from ember.quant.gguf import dense_state_dict

    dense = ember.load_model(path)
    state = dense_state_dict(kept)
    for key, value in dense_state_dict(dense).items():
        if key.endswith(("q_proj.weight", "v_proj.weight", "gate_proj.weight")):
            continue  # Q4_K in the file: requantized to Q8_0 when kept
        assert torch.equal(state[key], value), key
