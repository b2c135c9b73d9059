"""Fixtures for the data tests: the small corpus folders and tokenizer of tests/textdata.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ember.tokenizer import Tokenizer
from tests.textdata import small_tokenizer, write_corpus


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def tok() -> Tokenizer:
    return small_tokenizer()


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core box: one intra-op thread is several times faster (a second
    thread that is descheduled stalls every small op), and results do not depend on it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
