"""Fixtures for the data tests: the small corpus folders and tokenizer of tests/textdata.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from ember.tokenizer import Tokenizer
from tests.textdata import one_thread, small_tokenizer, write_corpus  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def tok() -> Tokenizer:
    return small_tokenizer()
