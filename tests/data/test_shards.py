"""Token shards: exact round trip of the token stream, deterministic held-out split, bad folders."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from ember.data.shards import MANIFEST, TokenShards, build_shards, holdout_key, token_dtype
from ember.data.sources import DataSourceError, Document, path_documents


def _docs(corpus) -> list[Document]:
    return list(path_documents(corpus))


def _stream(tok, docs: list[Document]) -> list[int]:
    out: list[int] = []
    for d in docs:
        out += tok.encode(d.text, add_special_tokens=False) + [tok.eos_token_id]
    return out


def test_shards_hold_every_document_once_with_eos(corpus, tok, tmp_path) -> None:
    docs = _docs(corpus)
    manifest = build_shards(docs, tok, tmp_path / "s", val_fraction=0.1, shard_tokens=5000, show_progress=False)
    train, val = TokenShards(tmp_path / "s", "train"), TokenShards(tmp_path / "s", "val")
    assert len(train.shards) > 1 and all(s.dtype == np.uint16 for s in train.shards)  # split over files
    held = [d for d in docs if holdout_key(d.text) < 0.1]
    assert held, "the corpus should put some documents in validation at 10 %"
    assert np.concatenate(val.shards).tolist() == _stream(tok, held)
    # Training holds the rest, each document intact and EOS-terminated (order may differ by one
    # document: the smallest-key one is written last in case validation needed it).
    train_ids = np.concatenate(train.shards).tolist()
    assert sorted(_split_docs(train_ids, tok.eos_token_id)) == sorted(
        _split_docs(_stream(tok, [d for d in docs if d not in held]), tok.eos_token_id))
    assert manifest["splits"]["train"]["tokens"] == train.num_tokens == len(train_ids)
    assert json.loads((tmp_path / "s" / MANIFEST).read_text())["vocab_size"] == tok.vocab_size


def _split_docs(ids: list[int], eos: int) -> list[tuple[int, ...]]:
    docs, cur = [], []
    for i in ids:
        cur.append(i)
        if i == eos:
            docs.append(tuple(cur))
            cur = []
    return docs


def test_holdout_split_is_independent_of_order_and_never_empty(corpus, tok, tmp_path) -> None:
    docs = _docs(corpus)
    shuffled = docs[:]
    random.Random(1).shuffle(shuffled)
    build_shards(docs, tok, tmp_path / "a", val_fraction=0.1, show_progress=False)
    build_shards(shuffled, tok, tmp_path / "b", val_fraction=0.1, show_progress=False)
    a = _split_docs(np.concatenate(TokenShards(tmp_path / "a", "val").shards).tolist(), tok.eos_token_id)
    b = _split_docs(np.concatenate(TokenShards(tmp_path / "b", "val").shards).tolist(), tok.eos_token_id)
    assert sorted(a) == sorted(b) and a
    # A fraction so small that no document qualifies still holds out exactly one.
    m = build_shards(docs, tok, tmp_path / "c", val_fraction=1e-9, show_progress=False)
    assert m["splits"]["val"]["documents"] == 1
    assert m["splits"]["train"]["documents"] == len(docs) - 1


def test_token_dtype_widens_for_large_vocabularies() -> None:
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_bad_shard_folders_are_clear_errors(corpus, tok, tmp_path) -> None:
    with pytest.raises(DataSourceError, match="not a token shard folder"):
        TokenShards(tmp_path, "train")
    build_shards(_docs(corpus), tok, tmp_path / "s", show_progress=False)
    shard = tmp_path / "s" / "train-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])  # truncated
    with pytest.raises(DataSourceError, match="wrong size"):
        TokenShards(tmp_path / "s", "train")


def test_empty_sources_are_clear_errors(tok, tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataSourceError, match="no text found"):
        list(path_documents([tmp_path / "empty"]))
    with pytest.raises(DataSourceError, match="does not exist"):
        list(path_documents([tmp_path / "missing"]))
    with pytest.raises(DataSourceError, match="no training text"):
        build_shards([], tok, tmp_path / "s", show_progress=False)
    assert not (tmp_path / "s" / MANIFEST).exists()  # a failed build leaves no manifest behind
