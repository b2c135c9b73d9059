"""Packed loader: windows of the token stream, exact resume, rank sharding, mixture shares."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ember.data.loader import PackedLoader
from ember.data.mixture import parse_mixture, prepare_mixture
from ember.data.shards import TokenShards
from ember.data.sources import DataSourceError


@pytest.fixture(scope="module")
def train_sets(corpus, tok, tmp_path_factory):
    prose, code = corpus
    comps = parse_mixture([f"{prose}@0.7", f"{code}@0.3"])
    folders = prepare_mixture(comps, tok, tmp_path_factory.mktemp("data"), show_progress=False)
    return [TokenShards(f, "train") for f in folders]


def _loader(train_sets, **kw) -> PackedLoader:
    args = dict(seq_len=32, micro_batch=4, rank=0, world=1, seed=0) | kw
    return PackedLoader(train_sets, [0.7, 0.3], **args)


def test_batches_are_windows_of_the_token_stream(train_sets) -> None:
    batch = _loader(train_sets).next_batch()
    assert batch.shape == (4, 33) and batch.dtype == torch.int64
    streams = [np.concatenate(t.shards) for t in train_sets]
    for row in batch.numpy():
        assert any(_contains(s, row) for s in streams)


def _contains(stream: np.ndarray, row: np.ndarray) -> bool:
    starts = np.flatnonzero(stream[:-len(row) + 1] == row[0])
    return any((stream[i:i + len(row)] == row).all() for i in starts)


def test_position_restores_exactly(train_sets) -> None:
    a = _loader(train_sets)
    for _ in range(7):
        a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch() for _ in range(5)]
    b = _loader(train_sets)
    b.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(expected, [b.next_batch() for _ in range(5)]))


def test_ranks_split_the_single_process_stream(train_sets) -> None:
    single = _loader(train_sets, micro_batch=2)
    r0 = _loader(train_sets, micro_batch=2, rank=0, world=2)
    r1 = _loader(train_sets, micro_batch=2, rank=1, world=2)
    for _ in range(4):
        assert torch.equal(single.next_batch(), r0.next_batch())
        assert torch.equal(single.next_batch(), r1.next_batch())
    assert r0.state_dict() == r1.state_dict() == single.state_dict()


def test_token_shares_follow_the_weights_and_small_sources_repeat(train_sets) -> None:
    loader = _loader(train_sets, seq_len=256, micro_batch=10)
    for _ in range(100):
        loader.next_batch()
    prose, code = loader.state_dict()["picks"]
    assert (prose, code) == (700, 300)
    # Prose has fewer windows than its 700 picks: it repeats, each epoch visiting every window
    # exactly once, in a fresh order.
    w = loader.windows[0]
    n = len(w)
    assert prose > n
    every = sorted(tuple(w.get(i)) for i in range(n))
    epoch0 = [tuple(loader._window(0, p)) for p in range(n)]
    epoch1 = [tuple(loader._window(0, p)) for p in range(n, 2 * n)]
    assert sorted(epoch0) == sorted(epoch1) == every
    assert epoch0 != epoch1


def test_too_little_data_for_one_sequence(train_sets) -> None:
    with pytest.raises(DataSourceError, match="lower --seq-len"):
        _loader(train_sets, seq_len=10**8)
