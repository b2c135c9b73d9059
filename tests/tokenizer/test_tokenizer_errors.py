"""User mistakes give one TokenizerError line that names the path or value and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from ember.tokenizer import Tokenizer, TokenizerError, load_tokenizer, train_tokenizer


def test_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(TokenizerError, match=f"{missing}.*does not exist"):
        load_tokenizer(missing)


def test_folder_without_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TokenizerError, match=f"no tokenizer.json in {tmp_path}: train one"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("content", ["{not json", '{"model": {"type": "BPE"}}', ""])
def test_corrupt_tokenizer_json(tmp_path: Path, content: str) -> None:
    (tmp_path / "tokenizer.json").write_text(content)
    with pytest.raises(TokenizerError, match=f"{tmp_path / 'tokenizer.json'} is not a valid tokenizer.json"):
        load_tokenizer(tmp_path)


def test_corrupt_tokenizer_config(bpe_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((bpe_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": ')
    with pytest.raises(TokenizerError, match=f"{tmp_path / 'tokenizer_config.json'} is not valid JSON"):
        load_tokenizer(tmp_path / "tokenizer.json")


def test_vocab_size_too_small() -> None:
    with pytest.raises(TokenizerError, match="vocab_size=200 is too small: it must exceed 256 bytes"):
        train_tokenizer(["some text"], vocab_size=200, show_progress=False)
    with pytest.raises(TokenizerError, match="vocab_size=260 is too small"):
        train_tokenizer(["some text"], vocab_size=260, kind="unigram", show_progress=False)


@pytest.mark.parametrize("texts", [[], iter([]), ["", ""]])
def test_empty_texts(texts: object) -> None:
    with pytest.raises(TokenizerError, match="no text to train the tokenizer on"):
        train_tokenizer(texts, vocab_size=1000, show_progress=False)  # type: ignore[arg-type]


def test_unknown_kind() -> None:
    with pytest.raises(TokenizerError, match="unknown tokenizer kind 'wordpiece'"):
        train_tokenizer(["x"], vocab_size=1000, kind="wordpiece", show_progress=False)  # type: ignore[arg-type]


def test_no_chat_template(bpe: Tokenizer) -> None:
    bare = Tokenizer(bpe.backend, special_tokens=bpe.special_tokens, chat_template=None)
    with pytest.raises(TokenizerError, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "hi"}])


def test_bad_messages(bpe: Tokenizer) -> None:
    with pytest.raises(TokenizerError, match="empty conversation"):
        bpe.apply_chat_template([])
    with pytest.raises(TokenizerError, match="unknown chat role User"):
        bpe.apply_chat_template([{"role": "User", "content": "hi"}])


def test_out_of_range_id(bpe: Tokenizer) -> None:
    with pytest.raises(TokenizerError, match=f"token id {bpe.vocab_size} is outside"):
        bpe.convert_ids_to_tokens([0, bpe.vocab_size])
