"""Fixtures for the training tests: a small corpus, its tokenizer, and tiny pretraining configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.textdata import one_thread, small_tokenizer, write_corpus  # noqa: F401 (autouse fixture)
from tests.train.tinyrun import tiny_config


@pytest.fixture(scope="session")
def textdata(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Corpus folders, a saved tokenizer and a shared token-shard cache."""
    root = tmp_path_factory.mktemp("pretrain")
    prose, code = write_corpus(root / "corpus")
    small_tokenizer().save(root / "tok")
    return {"prose": prose, "code": code, "tok": root / "tok", "data": root / "shards"}


@pytest.fixture
def make_config(textdata):
    return lambda out, **kw: tiny_config(textdata, out, **kw)
