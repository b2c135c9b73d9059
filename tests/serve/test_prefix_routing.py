"""Prefix routing keys and the affinity policy (ember/serve/prefix_routing.py), without Ray."""

from __future__ import annotations

import json

import pytest

from ember.serve.prefix_routing import PrefixAffinity, block_hashes, prefix_hashes, prompt_of


def body(**kw) -> bytes:
    return json.dumps(kw).encode()


def test_shared_prefix_shares_exactly_its_full_blocks():
    shared = "You are a careful assistant. " * 20  # 580 chars: 9 full 64-char blocks
    a = block_hashes(shared + "What is a tuple?")
    b = block_hashes(shared + "Explain generators in detail, please, with examples.")
    common = len(shared) // 64
    assert a[:common] == b[:common]
    assert len(a) == (len(shared) + 16) // 64 and len(b) == (len(shared) + 52) // 64
    # a difference in the first block changes every hash after it (chained, as the engine's block hashes)
    c = block_hashes("Z" + shared[1:] + "What is a tuple?")
    assert not set(c) & set(a)


def test_short_prompts_have_no_key_and_token_ids_hash_in_blocks_of_ids():
    assert block_hashes("short") == []
    ids = list(range(40))
    assert len(block_hashes(ids)) == 2  # 16 ids a block
    assert block_hashes(ids)[:2] == block_hashes(ids[:32] + [7, 7])[:2]


def test_prompt_of_openai_bodies():
    assert prompt_of("/v1/completions", body(prompt="abc")) == "abc"
    assert prompt_of("/v1/completions", body(prompt=["first", "second"])) == "first"
    assert prompt_of("/v1/completions", body(prompt=[1, 2, 3])) == [1, 2, 3]
    chat = body(messages=[{"role": "system", "content": "S"},
                          {"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    assert prompt_of("/v1/chat/completions", chat) == "<system>S<user>hi"
    # what routing cannot read, the replica answers (a 400 there); routing only needs no key
    assert prompt_of("/v1/completions", b"{not json") is None
    assert prompt_of("/v1/completions", body(prompt=None)) is None
    assert prompt_of("/v1/models", b"") is None
    assert prefix_hashes("/v1/chat/completions", body(messages="nope")) == []


def test_affinity_prefers_the_replica_holding_the_longest_prefix():
    aff = PrefixAffinity(imbalance_threshold=4, seed=0)
    long_a = block_hashes("x" * 640)            # 10 blocks
    aff.record(long_a, "r2")
    aff.record(long_a[:3], "r1")   # later requests sharing 3 blocks went to r1
    assert aff.match(long_a, {"r1": 0, "r2": 0}) == ("r2", 10)
    assert aff.choose(long_a, {"r1": 0, "r2": 3}) == "r2"
    # r2 gone (not a candidate): the next longest match is r1's
    assert aff.choose(long_a, {"r1": 5, "r3": 5}) == "r1"
    aff.forget("r1")
    assert aff.match(long_a, {"r1": 0, "r3": 0}) == (None, 0)


def test_affinity_gives_way_to_load():
    aff = PrefixAffinity(imbalance_threshold=4, seed=0)
    h = block_hashes("y" * 256)
    aff.record(h, "r1")
    assert aff.choose(h, {"r1": 6, "r2": 2}) == "r1"   # 4 more in flight: still within the threshold
    assert aff.choose(h, {"r1": 7, "r2": 2}) == "r2"   # 5 more: the least loaded instead


def test_unmatched_requests_spread_over_idle_replicas():
    aff = PrefixAffinity(seed=1)
    picks = {aff.choose([], {"r1": 0, "r2": 0}) for _ in range(50)}
    assert picks == {"r1", "r2"}
    assert aff.choose([], {"r1": 3, "r2": 1}) == "r2"
    with pytest.raises(ValueError):
        aff.choose([], {})


def test_table_is_bounded():
    aff = PrefixAffinity(max_entries=8)
    for i in range(10):
        aff.record(block_hashes(str(i) * 128), f"r{i}")  # 2 blocks each
    assert len(aff) == 8
    assert aff.match(block_hashes("0" * 128), {"r0": 0}) == (None, 0)   # the oldest went first
    assert aff.match(block_hashes("9" * 128), {"r9": 0}) == ("r9", 2)
