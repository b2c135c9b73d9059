"""KV offload tier: evicted prefix blocks come back from it, preempted sequences are swapped to it.

Outputs are compared with an engine without a tier (and the naive generate) on the same model,
for every KV cache dtype the engine supports; the bookkeeping's invariants (pool and tier) hold
after every run; the tier itself is checked for bit-exact round trips, LRU dropping when full,
pinned swaps, and the clear errors a user can cause.
"""

from __future__ import annotations

import zlib
from array import array

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ember.config import preset
from ember.engine import LLM, SamplingParams
from ember.engine.config import EngineConfig, EngineConfigError
from ember.engine.kv_cache import KVCacheManager, hash_block
from ember.engine.kv_offload import KVOffloadError, KVOffloadTier
from ember.engine.request import Request
from ember.model.generate import generate
from tests.engine.conftest import spread_model
from tests.engine.test_engine_parity import NEW as PARITY_NEW
from tests.engine.test_engine_parity import REGIMES, _check_engine, _prompts

NEW = 8
GREEDY = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
DTYPES = ["auto", "float16", "bfloat16"]


@pytest.fixture(scope="module")
def model():
    return spread_model(preset("tiny", vocab_size=512).replace(num_kv_heads=2, max_position_embeddings=256))


def _two_prompts(n: int = 80) -> tuple[list[int], list[int]]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, 512, (n,), generator=g).tolist(), torch.randint(3, 512, (n,), generator=g).tolist()


def _prefix_hashes(prompt: list[int], block_size: int) -> list[bytes]:
    """The hashes of the prompt blocks a prefix-cache lookup may hit (one token always stays)."""
    hashes: list[bytes] = []
    for i in range((len(prompt) - 1) // block_size):
        hashes.append(hash_block(hashes[-1] if hashes else b"", prompt[i * block_size:(i + 1) * block_size]))
    return hashes


def _one_by_one(llm: LLM, prompts: list[list[int]]) -> list:
    """One request at a time, so each finds the pool as the previous one left it."""
    return [llm.generate([p], GREEDY)[0] for p in prompts]


def _tokens(outs: list) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("kv_dtype", DTYPES)
def test_a_returning_prompt_is_restored_from_the_tier(model, kv_dtype: str) -> None:
    a, b = _two_prompts()
    # 12 blocks x 8 tokens: B's 88 tokens evict most of A's blocks from the pool.
    plain = LLM(model, num_kv_blocks=12, block_size=8, kv_cache_dtype=kv_dtype)
    tiered = LLM(model, num_kv_blocks=12, block_size=8, kv_cache_dtype=kv_dtype, kv_offload_gb=0.01)
    ref = _one_by_one(plain, [a, b, a])
    outs = _one_by_one(tiered, [a, b])
    kv = tiered.engine.kv
    hashes = _prefix_hashes(a, 8)
    in_pool = sum(h in kv.cached for h in hashes)
    assert in_pool <= 2 and all(h in kv.offload for h in hashes[in_pool:])  # really evicted, really kept
    outs += _one_by_one(tiered, [a])
    assert _tokens(outs) == _tokens(ref)
    stats = tiered.engine.stats().kv_offload
    assert outs[2].num_cached_tokens == len(hashes) * 8  # the whole prefix: pool hits, then the tier
    assert ref[2].num_cached_tokens == in_pool * 8  # without the tier, the rest was recomputed
    assert stats.restored_prefix_blocks == len(hashes) - in_pool
    assert stats.stored_prefix_blocks >= len(hashes) - in_pool and stats.dropped_blocks == 0
    if kv_dtype == "auto":  # and the naive decoder agrees
        assert outs[2].outputs[0].token_ids == generate(model, torch.tensor([a]), NEW)[0, len(a):].tolist()
    kv.check_invariants()
    assert not kv.offload.swapped


def _count_computed(llm: LLM) -> list[int]:
    """Tokens the engine computes, counted per step as the scheduler hands them out."""
    sched, counted = llm.engine.scheduler, [0]
    schedule = sched.schedule

    def counting():
        out = schedule()
        counted[0] += out.total_tokens
        return out

    sched.schedule = counting
    return counted


@pytest.mark.parametrize("kv_dtype", DTYPES)
def test_preempted_sequences_are_swapped_not_recomputed(model, kv_dtype: str) -> None:
    prompts = _prompts(512)
    expected = _tokens(LLM(model, kv_cache_dtype=kv_dtype, enable_prefix_caching=False).generate(
        prompts, SamplingParams(temperature=0, max_tokens=PARITY_NEW, ignore_eos=True)))
    cfg = dict(REGIMES["preemption"], enable_prefix_caching=False, kv_cache_dtype=kv_dtype)
    recompute, swap = LLM(model, **cfg), LLM(model, kv_offload_gb=0.01, **cfg)
    counted = {name: _count_computed(llm) for name, llm in (("recompute", recompute), ("swap", swap))}
    _check_engine(recompute, prompts, expected)
    _check_engine(swap, prompts, expected)
    stats = swap.engine.stats().kv_offload
    assert swap.engine.scheduler.num_preemptions == stats.swapped_sequences > 0
    assert stats.restored_swap_blocks == stats.stored_swap_blocks > 0
    # Every token computed exactly once (the last sampled token of each never is) ...
    assert counted["swap"][0] == sum(len(p) + PARITY_NEW - 1 for p in prompts)
    assert counted["recompute"][0] > counted["swap"][0]  # ... where recompute computes some twice
    swap.engine.kv.check_invariants()
    assert not swap.engine.kv.offload.swapped and swap.engine.kv.offload.usage == 0


def test_greedy_with_swaps_and_restores_matches_transformers(tmp_path) -> None:
    """The outside reference: transformers' greedy generate, against an engine that swaps (a pool
    too small for the batch) and then, serving the same prompts again, restores their evicted
    prefix blocks from the tier."""
    import ember
    from tests.hf_models import make_hf_model

    hf = make_hf_model("llama-gqa-llama3-rope", tmp_path)
    prompts = _prompts(128)[1::2]  # the eight that share a 40-token prefix, 3 to 90 tokens long
    with torch.no_grad():
        ref = [hf.generate(torch.tensor([p]), max_new_tokens=PARITY_NEW, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    llm = LLM(ember.load_model(tmp_path), kv_offload_gb=0.01, **REGIMES["preemption"])
    _check_engine(llm, prompts, ref)
    assert llm.engine.stats().kv_offload.swapped_sequences > 0
    _check_engine(llm, prompts, ref)
    assert llm.engine.stats().kv_offload.restored_prefix_blocks > 0


def test_a_tier_too_small_for_a_swap_falls_back_to_recompute(model) -> None:
    prompts = _prompts(512)
    expected = _tokens(LLM(model).generate(prompts, SamplingParams(temperature=0, max_tokens=PARITY_NEW,
                                                                  ignore_eos=True)))
    block_bytes = 8 * model.config.kv_bytes_per_token(4)  # block_size 8, fp32
    llm = LLM(model, kv_offload_gb=1.5 * block_bytes / 2**30, **REGIMES["preemption"])
    assert llm.engine.kv.offload.num_slots == 1
    _check_engine(llm, prompts, expected)
    stats = llm.engine.stats().kv_offload
    assert llm.engine.scheduler.num_preemptions > stats.swapped_sequences
    llm.engine.kv.check_invariants()


def test_an_aborted_swapped_request_frees_its_slots(model) -> None:
    llm = LLM(model, kv_offload_gb=0.01, **REGIMES["preemption"])
    engine = llm.engine
    for i, p in enumerate(_prompts(512)):
        engine.add_request(str(i), p, GREEDY)
    while not engine.kv.offload.swapped:
        engine.step()
    for rid in list(engine.kv.offload.swapped):
        engine.abort(rid)
    assert not engine.kv.offload.swapped
    while engine.has_unfinished():
        engine.step()
    engine.kv.check_invariants()
    assert not engine.kv.offload.swapped


# ---- the tier on its own -------------------------------------------------------------------------
def _pool(dtype: torch.dtype, blocks: int = 4) -> tuple[torch.Tensor, bytearray]:
    g = torch.Generator().manual_seed(0)
    return torch.randn((2, 2, blocks, 2, 4, 8), generator=g).to(dtype), bytearray(blocks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_blocks_round_trip_bit_exact_in_every_dtype(dtype: torch.dtype, tmp_path) -> None:
    pool, init = _pool(dtype)
    tier = KVOffloadTier(pool, init, 3, str(tmp_path))
    assert list(tmp_path.iterdir()) == []  # the file is unlinked once mapped
    before = pool.clone()
    tier.spill(1, b"h1")
    assert tier.swap_out("r", [2, 3])
    pool.zero_()
    tier.restore([b"h1"], tier.pin([b"h1"]), [0])
    tier.swap_in("r", [1, 2, 3])  # a swapped table of 2 blocks comes back into the first two given
    assert torch.equal(pool[:, :, 0], before[:, :, 1])
    assert torch.equal(pool[:, :, 1:3], before[:, :, 2:4])
    assert pool[:, :, 3].abs().sum() == 0
    assert list(init) == [1, 1, 1, 0]  # restored blocks are not zeroed by the runner
    tier.check_invariants()


def test_a_full_tier_drops_its_least_recently_used_prefix_block() -> None:
    pool, init = _pool(torch.float32)
    tier = KVOffloadTier(pool, init, 2)
    tier.spill(0, b"a")
    tier.spill(1, b"b")
    tier.spill(0, b"a")  # already there: only marked recently used
    tier.spill(2, b"c")
    assert b"b" not in tier and b"a" in tier and b"c" in tier and tier.dropped_blocks == 1
    assert tier.stored_prefix_blocks == 3
    assert tier.swap_out("r", [3])  # a swap may drop prefix blocks too ...
    assert not tier.swap_out("s", [0, 1])  # ... but never another swapped sequence
    tier.spill(1, b"d")  # nor does a spill: with every slot swapped or just used, the LRU one goes
    tier.check_invariants()
    assert tier.is_swapped("r") and not tier.is_swapped("s") and len(tier.swapped["r"]) == 1


def test_tier_errors_are_one_clear_line(tmp_path) -> None:
    pool, init = _pool(torch.float32)
    with pytest.raises(KVOffloadError, match="is not a directory"):
        KVOffloadTier(pool, init, 2, str(tmp_path / "missing"))
    with pytest.raises(KVOffloadError, match="cannot create the KV offload file in '/proc'.*writable --kv-offload-dir"):
        KVOffloadTier(pool, init, 2, "/proc")
    with pytest.raises(KVOffloadError, match="smaller than one KV block"):
        KVOffloadTier.sized(pool, init, 1e-9)
    with pytest.raises(EngineConfigError, match="kv_offload_dir is set but kv_offload_gb is 0"):
        EngineConfig(kv_offload_dir=str(tmp_path))
    with pytest.raises(EngineConfigError, match="kv_offload_gb must be >= 0"):
        EngineConfig(kv_offload_gb=-1)
    with pytest.raises(EngineConfigError, match="kv_offload_gb with tensor or pipeline parallel is not supported"):
        EngineConfig(kv_offload_gb=1.0, tensor_parallel_size=2)


# ---- the bookkeeping under random interleavings, with contents ------------------------------------
PREFIXES = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [1, 2, 3, 4, 11, 12], [20, 21, 22, 23, 24, 25, 26, 27, 28]]
# Adds and frees weighted up, so that prefixes are evicted from the pool and come back often.
ops = st.lists(st.tuples(st.sampled_from(["add", "add", "free", "free", "step", "fork", "preempt", "resume"]),
                         st.integers(0, 1000), st.integers(0, 1000)), min_size=10, max_size=80)


def _stamp(tokens: list[int], p: int) -> float:
    """What "computing" position p writes: a function of the tokens up to p (exact in fp32)."""
    return float(zlib.crc32(array("q", tokens[:p + 1]).tobytes()) % 2**20)


@settings(max_examples=150, deadline=None)
@given(ops=ops, num_blocks=st.integers(2, 10), block_size=st.sampled_from([1, 1, 2, 4]), slots=st.integers(1, 12))
def test_random_interleavings_keep_every_computed_position(ops, num_blocks: int, block_size: int, slots: int) -> None:
    """Spills, restores, swaps out and in, forks (copy-on-write) and evictions in any order: every
    live request's computed positions hold exactly what computing them wrote."""
    kv, bs = KVCacheManager(num_blocks, block_size), block_size
    pool = torch.full((1, 2, num_blocks, 1, bs, 1), -1.0)
    kv.offload = tier = KVOffloadTier(pool, bytearray(num_blocks), slots)
    live: list[Request] = []
    swapped: list[Request] = []
    counter = 0

    def compute(req: Request, n: int) -> None:
        for src, dst in kv.take_pending_copies():  # as the runner does before the forward
            pool[:, :, dst] = pool[:, :, src]
        table = kv.block_table(req.request_id)
        for p in range(req.num_computed_tokens, req.num_computed_tokens + n):
            pool[0, :, table[p // bs], 0, p % bs, 0] = _stamp(req.token_ids, p)
        req.num_computed_tokens += n

    for op, a, b in ops:
        if op == "add":
            req = Request(f"r{counter}", PREFIXES[a % 3][:1 + b % 10] + [100 + b % 7] * (a % 5),
                          SamplingParams(max_tokens=8), max_tokens=8)
            counter += 1
            hits = kv.get_computed_blocks(req)
            restore = kv.offloaded_prefix(req, len(hits))
            cached = (len(hits) + len(restore)) * bs
            if kv.allocate_slots(req, req.num_tokens - cached, hits, restore):
                req.num_computed_tokens = cached
                kv.cache_blocks(req, req.num_tokens)
                compute(req, req.num_tokens - cached)
                live.append(req)
        elif op == "resume" and swapped:
            req = swapped[a % len(swapped)]
            if kv.allocate_slots(req, 0):
                kv.swap_in(req)
                kv.cache_blocks(req, req.num_computed_tokens)
                swapped.remove(req)
                live.append(req)
        elif live and op in ("step", "fork", "free", "preempt"):
            req = live[a % len(live)]
            if op == "step":
                req.token_ids.append(b % 50)
                if kv.allocate_slots(req, 1):
                    kv.cache_blocks(req, req.num_computed_tokens + 1)
                    compute(req, 1)
                else:
                    req.token_ids.pop()
            elif op == "fork":
                child = req.fork(1 + counter)
                child.request_id = f"r{counter}"
                counter += 1
                kv.fork(req, child)
                live.append(child)
            else:
                if op == "preempt" and kv.swap_out(req):
                    swapped.append(req)
                kv.free(req)
                live.remove(req)
        kv.check_invariants()
        for req in live:
            table = kv.block_table(req.request_id)
            got = [pool[0, 0, table[p // bs], 0, p % bs, 0].item() for p in range(req.num_computed_tokens)]
            assert got == [_stamp(req.token_ids, p) for p in range(req.num_computed_tokens)]
    for req in live:
        kv.free(req)
    for req in swapped:
        tier.discard(req.request_id)
    kv.check_invariants()
    assert not tier.swapped and len(tier.free_slots) + len(tier.prefix) == slots
