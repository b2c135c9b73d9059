"""Property tests of the block manager: random interleavings keep every invariant.

Operations: add a request (with a random prompt drawn from a few shared prefixes), schedule
some of its tokens (allocate_slots with prefix-cache hits), compute + append a token, fork
(n > 1), free (finish or abort) and preempt. After each operation `check_invariants` holds
(ref counts equal table membership, the free queue is exactly the unreferenced blocks, cached
hashes point at blocks carrying them); at the end everything is free again.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ember.engine.kv_cache import KVCacheManager, hash_block
from ember.engine.request import Request
from ember.engine.sampling_params import SamplingParams

PREFIXES = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [1, 2, 3, 4, 11, 12], [20, 21, 22, 23, 24, 25, 26, 27, 28]]

ops = st.lists(st.tuples(st.sampled_from(["add", "step", "fork", "free", "preempt"]),
                         st.integers(0, 1000), st.integers(0, 1000)), min_size=1, max_size=80)


@settings(max_examples=150, deadline=None)
@given(ops=ops, num_blocks=st.integers(1, 12), block_size=st.sampled_from([1, 2, 4]),
       caching=st.booleans())
def test_random_interleavings_keep_invariants(ops, num_blocks: int, block_size: int, caching: bool) -> None:
    kv = KVCacheManager(num_blocks, block_size, caching)
    live: list[Request] = []
    counter = 0
    for op, a, b in ops:
        if op == "add":
            prompt = PREFIXES[a % 3][: 1 + b % 10] + [100 + b % 7] * (a % 5)
            req = Request(f"r{counter}", prompt, SamplingParams(max_tokens=8), max_tokens=8)
            counter += 1
            hits = kv.get_computed_blocks(req)
            assert len(hits) * block_size < req.num_tokens  # one token always left to compute
            n = req.num_tokens - len(hits) * block_size
            if kv.allocate_slots(req, n, hits):
                kv.cache_blocks(req, len(hits) * block_size + n)
                req.num_computed_tokens = len(hits) * block_size + n
                live.append(req)
        elif live:
            req = live[a % len(live)]
            if op == "step":  # sample a token, then compute it next step
                req.token_ids.append(b % 50)
                free_before = kv.num_free_blocks
                if kv.allocate_slots(req, 1):
                    kv.cache_blocks(req, req.num_computed_tokens + 1)
                    req.num_computed_tokens += 1
                else:
                    assert free_before == kv.num_free_blocks  # a failed allocation changes nothing
                    req.token_ids.pop()
            elif op == "fork":
                child = req.fork(1 + counter)
                child.request_id = f"r{counter}"
                counter += 1
                kv.fork(req, child)
                live.append(child)
            else:  # free (finish / abort) and preempt both drop every reference
                kv.free(req)
                live.remove(req)
        kv.check_invariants()
        for req in live:  # every computed token has a slot
            assert len(kv.block_table(req.request_id)) * block_size >= req.num_computed_tokens
    for req in live:
        kv.free(req)
    kv.check_invariants()
    assert kv.num_free_blocks == num_blocks and all(c == 0 for c in kv.ref_cnt)


def test_prefix_hits_share_blocks_and_survive_free_until_evicted() -> None:
    kv = KVCacheManager(num_blocks=6, block_size=4)
    a = Request("a", list(range(10)), SamplingParams(), 4)
    assert kv.get_computed_blocks(a) == [] and kv.allocate_slots(a, 10)
    kv.cache_blocks(a, 10)  # two full blocks cached
    a.num_computed_tokens = 10
    b = Request("b", list(range(9)) + [99], SamplingParams(), 4)
    hits = kv.get_computed_blocks(b)
    assert hits == kv.block_table("a")[:2]
    assert kv.allocate_slots(b, 2, hits)
    assert kv.ref_cnt[hits[0]] == 2
    kv.free(a)
    kv.free(b)
    # Freed, still findable: a third request reuses them without recomputation.
    c = Request("c", list(range(8)) + [5, 5], SamplingParams(), 4)
    assert kv.get_computed_blocks(c) == hits
    # Allocating the whole pool evicts them.
    d = Request("d", list(range(50, 74)), SamplingParams(), 4)
    assert kv.allocate_slots(d, 24)
    assert kv.get_computed_blocks(c) == []
    kv.check_invariants()


def test_block_hash_chains_the_parent() -> None:
    h1 = hash_block(b"", [1, 2])
    assert hash_block(h1, [3, 4]) != hash_block(hash_block(b"", [9, 9]), [3, 4])
    assert hash_block(h1, [3, 4]) == hash_block(hash_block(b"", [1, 2]), [3, 4])


def test_fork_copies_the_shared_partial_block_on_write() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4)
    parent = Request("p", list(range(6)), SamplingParams(n=2), 4)
    assert kv.allocate_slots(parent, 6)
    parent.num_computed_tokens = 6
    child = parent.fork(1)
    kv.fork(parent, child)
    shared_full, shared_partial = kv.block_table("p")
    child.token_ids.append(7)
    assert kv.allocate_slots(child, 1)
    assert kv.block_table(child.request_id)[0] == shared_full  # full block still shared
    new_partial = kv.block_table(child.request_id)[1]
    assert new_partial != shared_partial
    assert kv.take_pending_copies() == [(shared_partial, new_partial)]
    kv.check_invariants()
