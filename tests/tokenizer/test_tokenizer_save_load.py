"""save() then load_tokenizer() gives back the same tokenizer, and save() is a polite writer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from ember.tokenizer import DEFAULT_CHAT_TEMPLATE, Tokenizer, load_tokenizer


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_round_trip(kind: str, request: pytest.FixtureRequest, tmp_path: Path, corpus: list[str]) -> None:
    trained: Tokenizer = request.getfixturevalue(kind)
    tok = Tokenizer(trained.backend, trained.special_tokens, trained.chat_template, model_max_length=4096)
    tok.save(tmp_path / "nested" / "dir")
    back = load_tokenizer(tmp_path / "nested" / "dir")
    assert back.backend.get_vocab() == tok.backend.get_vocab()
    assert back.special_tokens == tok.special_tokens == {
        "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|pad|>"}
    assert (back.bos_token_id, back.eos_token_id, back.pad_token_id) == (0, 0, 1)
    assert back.all_special_ids == tok.all_special_ids == [0, 1, 2, 3]
    assert back.chat_template == tok.chat_template == DEFAULT_CHAT_TEMPLATE
    assert back.model_max_length == 4096
    sample = corpus[0][:5000] + " <|im_start|>assistant\n😀<|im_end|>"
    assert back.encode(sample) == tok.encode(sample)
    assert back.decode(back.encode(sample), skip_special_tokens=True) == sample.replace(
        "<|im_start|>", "").replace("<|im_end|>", "")
    # a tokenizer.json path works too, and reads the configs next to it
    assert load_tokenizer(tmp_path / "nested" / "dir" / "tokenizer.json").chat_template == DEFAULT_CHAT_TEMPLATE


def test_saved_files(bpe: Tokenizer, tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    bpe.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model.safetensors", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["eos_token"] == "<|endoftext|>" and config["pad_token"] == "<|pad|>"
    assert config["added_tokens_decoder"]["2"]["content"] == "<|im_start|>"
    assert json.loads((tmp_path / "special_tokens_map.json").read_text())["pad_token"] == "<|pad|>"
    # saving again over the same folder is fine and leaves no temporary files behind
    bpe.save(tmp_path)
    assert len(list(tmp_path.iterdir())) == 4


def test_save_updates_template_files_that_would_shadow_it(bpe: Tokenizer, tmp_path: Path) -> None:
    (tmp_path / "chat_template.jinja").write_text("{{ 'stale' }}")
    bpe.save(tmp_path)
    assert load_tokenizer(tmp_path).chat_template == DEFAULT_CHAT_TEMPLATE
    untemplated = Tokenizer(bpe.backend, special_tokens=bpe.special_tokens, chat_template=None)
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "{{ 'stale' }}"}))
    untemplated.save(tmp_path)
    assert load_tokenizer(tmp_path).chat_template is None


def test_special_token_forms(hf_folder) -> None:
    """Special tokens as strings, AddedToken dicts, or only in the legacy special_tokens_map.json."""
    folder = hf_folder(
        {"bos_token": {"__type": "AddedToken", "content": "<|im_start|>", "lstrip": False},
         "eos_token": "<|im_end|>", "pad_token": None},
        files={"special_tokens_map.json": json.dumps({"pad_token": {"content": "<|pad|>"}, "unk_token": "<unk>"})},
    )
    tok = load_tokenizer(folder)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|pad|>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (2, 3, 1)
    # "<unk>" is not in the vocabulary: like transformers, loading adds it as a special token
    assert tok.token_to_id("<unk>") == tok.vocab_size - 1
    assert tok.token_to_id("<unk>") in tok.all_special_ids
    hf = AutoTokenizer.from_pretrained(folder)
    assert (hf.bos_token, hf.eos_token, hf.pad_token, hf.unk_token) == (
        tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token)
    assert len(hf) == tok.vocab_size and hf.unk_token_id == tok.token_to_id("<unk>")
