"""Fixtures for the training tests: a small corpus, its tokenizer, and tiny pretraining configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from ember.train.pretrain import PretrainConfig
from tests.textdata import small_tokenizer, write_corpus


@pytest.fixture(scope="session")
def textdata(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Corpus folders, a saved tokenizer and a shared token-shard cache."""
    root = tmp_path_factory.mktemp("pretrain")
    prose, code = write_corpus(root / "corpus")
    small_tokenizer().save(root / "tok")
    return {"prose": prose, "code": code, "tok": root / "tok", "data": root / "shards"}


def tiny_config(textdata: dict[str, Path], out: Path, **overrides) -> PretrainConfig:
    """A few-second pretraining run of the `tiny` preset on the small corpus."""
    values = dict(out=out, model="tiny", tokenizer=textdata["tok"],
                  data=[f"{textdata['prose']}@0.7", f"{textdata['code']}@0.3"], data_dir=textdata["data"],
                  seq_len=32, batch_size=4, micro_batch_size=2, max_steps=8, warmup_steps=2, lr=3e-3,
                  eval_every=4, save_every=3, val_sequences=4, val_fraction=0.1, progress=False)
    values.update(overrides)
    return PretrainConfig(**values)


@pytest.fixture
def make_config(textdata):
    return lambda out, **kw: tiny_config(textdata, out, **kw)
