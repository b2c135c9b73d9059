"""Checkpoint I/O: sharded files, dtypes, ember-only architectures, atomic re-saves."""

from __future__ import annotations

import json

import pytest
import torch

import ember
from ember.config import preset
from ember.model.transformer import Transformer
from tests.hf_models import make_hf_model


def test_sharded_save_loads_in_ember_and_transformers(tmp_path) -> None:
    import transformers

    model = Transformer(preset("tiny")).eval()
    ember.save_model(model, tmp_path, max_shard_bytes=100_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        ref = model(ids)
        assert torch.equal(ember.load_model(tmp_path)(ids), ref)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        assert (hf(ids).logits - ref).abs().max().item() < 1e-4
    # Re-saving unsharded removes the old shards and index rather than leaving a mixed folder.
    ember.save_model(model, tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("model-*-of-*.safetensors"))
    assert not (tmp_path / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_load(tmp_path, dtype: str) -> None:
    hf = make_hf_model("llama-gqa-llama3-rope", tmp_path)
    model = ember.load_model(tmp_path, dtype=dtype)
    assert all(p.dtype == getattr(torch, dtype) for p in model.parameters())
    ids = torch.randint(3, 128, (1, 16))
    with torch.no_grad():
        ref = hf(ids).logits
        ours = model(ids).float()
    # Half precision: same predictions, logits close at the scale of the format.
    assert (ours - ref).abs().max().item() < 0.1 * ref.abs().max().item()


def test_alibi_model_round_trips_as_ember_type(tmp_path) -> None:
    cfg = preset("tiny").replace(position="alibi", sliding_window=8)
    model = Transformer(cfg).eval()
    ember.save_model(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "ember"
    ids = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        assert torch.equal(ember.load_model(tmp_path)(ids), model(ids))


def test_loading_holds_no_meta_tensors(tmp_path) -> None:
    make_hf_model("qwen2-bias-tied", tmp_path)
    model = ember.load_model(tmp_path)
    assert all(not t.is_meta for t in model.state_dict().values())
    assert model.lm_head.weight is model.model.embed_tokens.weight
