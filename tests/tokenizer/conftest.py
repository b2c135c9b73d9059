"""Fixtures for the tokenizer tests: a small real corpus, tokenizers trained on it once per
session, and a factory for Hugging Face-shaped tokenizer folders written in the test."""

from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"

import pydoc_data.topics  # noqa: E402
import pytest  # noqa: E402

from ember.tokenizer import Tokenizer, train_tokenizer  # noqa: E402

_STDLIB_FILES = ("textwrap.py", "json/decoder.py", "string.py", "calendar.py")


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    """About 550 KB of English prose and Python source (pydoc topics + a few stdlib modules)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = list(pydoc_data.topics.topics.values())
    texts += [(stdlib / name).read_text(encoding="utf-8") for name in _STDLIB_FILES]
    # A little non-Latin text so multi-byte merges exist; the byte alphabet covers the rest.
    texts += ["Grüße aus München, ça va? 東京は晴れです。 Привет, мир! 🙂 안녕하세요"] * 20
    return texts


@pytest.fixture(scope="session")
def bpe(corpus: list[str]) -> Tokenizer:
    return train_tokenizer(corpus, vocab_size=2000, kind="bpe", show_progress=False)


@pytest.fixture(scope="session")
def unigram(corpus: list[str]) -> Tokenizer:
    return train_tokenizer(corpus, vocab_size=1500, kind="unigram", show_progress=False)


@pytest.fixture(scope="session")
def bpe_dir(bpe: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ember's trained BPE tokenizer saved as a folder."""
    out = tmp_path_factory.mktemp("bpe")
    bpe.save(out)
    return out


@pytest.fixture
def hf_folder(bpe_dir: Path, tmp_path: Path) -> Callable[..., Path]:
    """Write a Hub-shaped folder: ember's tokenizer.json plus a hand-written tokenizer_config.json.

    hf_folder(config, files={"chat_template.jinja": "..."}, tokenizer_json=dict) -> folder
    """

    def make(config: dict[str, Any], files: dict[str, str] | None = None,
             tokenizer_json: dict[str, Any] | None = None) -> Path:
        folder = tmp_path / f"model{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        source = (bpe_dir / "tokenizer.json").read_text(encoding="utf-8")
        (folder / "tokenizer.json").write_text(
            source if tokenizer_json is None else json.dumps(tokenizer_json), encoding="utf-8"
        )
        (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
        for name, text in (files or {}).items():
            (folder / name).write_text(text, encoding="utf-8")
        return folder

    return make

