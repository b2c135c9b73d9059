"""Every way a user can hand load_model a bad folder gives one clear CheckpointError/ConfigError."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file, save_file

import ember
from tests.hf_models import make_hf_model


def test_missing_folder(tmp_path) -> None:
    with pytest.raises(ember.CheckpointError, match="does not exist"):
        ember.load_model(tmp_path / "nope")


def test_folder_without_config(tmp_path) -> None:
    with pytest.raises(ember.CheckpointError, match="no config.json"):
        ember.load_model(tmp_path)


def test_unsupported_model_type(tmp_path) -> None:
    make_hf_model("llama-linear-rope", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ember.ConfigError, match="unsupported model_type 'gpt2'"):
        ember.load_model(tmp_path)


def test_shape_mismatch_names_tensor_and_shapes(tmp_path) -> None:
    make_hf_model("llama-linear-rope", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 80
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ember.CheckpointError,
                       match=r"tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight' .* has shape "
                             r"\((96, 64|64, 96)\) but the config expects \((80, 64|64, 80)\)"):
        ember.load_model(tmp_path)


def test_truncated_safetensors(tmp_path) -> None:
    make_hf_model("llama-linear-rope", tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ember.CheckpointError, match="truncated or corrupt"):
        ember.load_model(tmp_path)


def test_missing_tensor(tmp_path) -> None:
    make_hf_model("llama-linear-rope", tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.1.self_attn.k_proj.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ember.CheckpointError, match="k_proj"):
        ember.load_model(tmp_path)


def test_pickle_only_checkpoint_is_refused(tmp_path) -> None:
    make_hf_model("llama-linear-rope", tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(ember.CheckpointError, match="safetensors only"):
        ember.load_model(tmp_path)


def test_bad_json_config(tmp_path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ember.CheckpointError, match="not valid JSON"):
        ember.load_model(tmp_path)
