"""Fixtures for the training tests: a small corpus, its tokenizer, and tiny pretraining configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.textdata import small_tokenizer, write_corpus
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


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core box: one intra-op thread is several times faster (a second
    thread that is descheduled stalls every small op), and results do not depend on it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
