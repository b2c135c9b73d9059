"""Speculative decoding in the engine: greedy outputs identical to the plain engine on 16 prompts
(prompt lookup and a draft model) under every scheduler regime, the KV of rejected drafts rolled
back (pool whole again, prefix cache unpolluted), stops / max_tokens / logprobs / n > 1 /
structured outputs as without drafts, and seeded sampling keeping the target distribution
(chi-square on a tiny model)."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

import ember
from ember.config import preset
from ember.engine import LLM, SamplingParams
from ember.engine.spec_decode import SpeculativeConfigError
from ember.engine.structured_outputs import StructuredOutputsParams
from ember.model.transformer import Transformer
from tests.engine.conftest import spread_model

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
REGIMES = {
    "default": dict(num_kv_blocks=256, block_size=8),
    "small-chunks": dict(num_kv_blocks=256, block_size=8, max_num_batched_tokens=32, max_num_seqs=16),
    # 20 blocks x 8 tokens: the 16 requests need ~1,000 slots together
    "preemption": dict(num_kv_blocks=20, block_size=8, max_num_batched_tokens=48, max_num_seqs=16),
    # the same, preempted sequences swapped to a KV offload tier and back instead of recomputed
    "preemption-swap": dict(num_kv_blocks=20, block_size=8, max_num_batched_tokens=48, max_num_seqs=16,
                            kv_offload_gb=0.01),
}


def _prompts(vocab: int) -> list[list[int]]:
    """16 prompts that repeat a phrase (prompt lookup finds matches), of 6 to 96 tokens."""
    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(16):
        phrase = torch.randint(3, vocab, (3 + i,), generator=g).tolist()
        out.append((phrase * 4)[:6 + 6 * i])
    return out


def _truncated_copy(model: Transformer, layers: int) -> Transformer:
    """The first `layers` layers of model with its embedding, norm and head: a cheap draft."""
    draft = Transformer(model.config.replace(num_layers=layers)).eval()
    draft.load_state_dict(model.state_dict(), strict=False)
    return draft


@pytest.fixture(scope="module")
def model():
    return spread_model(preset("tiny", vocab_size=128, eos_token_id=(0,)), seed=1)


@pytest.fixture(scope="module")
def draft_dir(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("draft")
    ember.save_model(_truncated_copy(model, 1), path)
    return path


@pytest.fixture(scope="module")
def expected(model):
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=2)
    return LLM(model, num_kv_blocks=256, block_size=8).generate(_prompts(128), params)


def _spec(name: str, draft_dir) -> dict:
    if name == "ngram":
        return NGRAM
    return {"method": "draft_model", "model": str(draft_dir), "num_speculative_tokens": 3}


def _pool_whole(llm: LLM) -> None:
    kv = llm.engine.kv
    kv.check_invariants()
    assert kv.num_free_blocks == kv.num_blocks and not kv.tables


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_greedy_is_identical_to_the_plain_engine(model, draft_dir, expected, method, regime) -> None:
    llm = LLM(model, speculative_config=_spec(method, draft_dir), **REGIMES[regime])
    outs = llm.generate(_prompts(128), SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=2))
    for out, exp in zip(outs, expected):
        got, want = out.outputs[0], exp.outputs[0]
        assert got.token_ids == want.token_ids, f"prompt of {len(out.prompt_token_ids)} tokens diverged"
        assert got.finish_reason == "length"
        for a, b in zip(got.logprobs, want.logprobs):  # the target's raw logprobs at every position
            assert a.keys() == b.keys()
            assert all(abs(a[t].logprob - b[t].logprob) < 1e-5 and a[t].rank == b[t].rank for t in a)
        assert abs(got.cumulative_logprob - want.cumulative_logprob) < 1e-4
    s = llm.engine.stats()
    # both paths ran: drafts accepted, and drafts rejected (rolled back)
    assert 0 < s.spec_decode_num_accepted_tokens < s.spec_decode_num_draft_tokens, s
    if regime.startswith("preemption"):
        assert s.num_preemptions > 0
    if regime == "preemption-swap":
        assert s.kv_offload.swapped_sequences > 0
    _pool_whole(llm)


def test_stops_and_lengths_cut_accepted_drafts_as_without_them(model, expected) -> None:
    prompts = _prompts(128)
    # stop at a token the plain run emits mid-way (often inside an accepted run of drafts), and
    # lengths that end inside a verification step
    params = [SamplingParams(temperature=0, max_tokens=5 + i, stop_token_ids=[exp.outputs[0].token_ids[9 + i % 7]])
              for i, exp in enumerate(expected)]
    plain = LLM(model, num_kv_blocks=256, block_size=8).generate(prompts, params)
    spec = LLM(model, speculative_config=NGRAM, num_kv_blocks=256, block_size=8)
    for a, b in zip(spec.generate(prompts, params), plain):
        assert (a.outputs[0].token_ids, a.outputs[0].finish_reason, a.outputs[0].stop_reason) == \
            (b.outputs[0].token_ids, b.outputs[0].finish_reason, b.outputs[0].stop_reason)
    _pool_whole(spec)


def test_rejected_drafts_never_enter_the_prefix_cache(model) -> None:
    """Prompts that extend earlier outputs hit blocks filled during speculation: their
    continuations must equal a fresh plain engine's (a hashed block holding a rejected draft's
    K/V would change them)."""
    prompts = _prompts(128)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    spec = LLM(model, speculative_config=NGRAM, num_kv_blocks=256, block_size=8)
    first = spec.generate(prompts, params)
    longer = [o.prompt_token_ids + o.outputs[0].token_ids for o in first]
    hits = spec.engine.kv.prefix_hits
    again = spec.generate(longer, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    assert spec.engine.kv.prefix_hits - hits > sum(len(p) for p in prompts)  # the outputs' blocks were hits
    fresh = LLM(model, num_kv_blocks=256, block_size=8, enable_prefix_caching=False).generate(
        longer, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in fresh]
    _pool_whole(spec)


def test_stop_strings_n_and_structured_outputs(tiny) -> None:
    model, tok = tiny
    text = "def parse(line): return line.split(',') def parse(line): return line"
    plain = LLM(model, tok, num_kv_blocks=256)
    spec = LLM(model, tok, speculative_config=NGRAM, num_kv_blocks=256)
    cases = [SamplingParams(temperature=0, max_tokens=30, stop=["ine"]),
             SamplingParams(temperature=0, max_tokens=12, n=3),
             SamplingParams(temperature=0, max_tokens=12,
                            structured_outputs=StructuredOutputsParams(choice=["split", "parse(line)"]))]
    for params in cases:
        a, b = spec.generate([text], params)[0], plain.generate([text], params)[0]
        assert [(c.text, c.token_ids, c.finish_reason) for c in a.outputs] == \
            [(c.text, c.token_ids, c.finish_reason) for c in b.outputs], params
    seeded = spec.generate([text], SamplingParams(temperature=0.8, max_tokens=12, n=3, seed=5))[0]
    assert len(seeded.outputs) == 3 and all(len(c.token_ids) == 12 for c in seeded.outputs)
    _pool_whole(spec)


def test_a_draft_model_with_another_vocabulary_is_refused(model, tmp_path) -> None:
    other = Transformer(preset("tiny", vocab_size=200)).eval()
    ember.save_model(other, tmp_path)
    with pytest.raises(SpeculativeConfigError, match="vocabulary of 200 tokens, the target 128"):
        LLM(model, speculative_config={"method": "draft_model", "model": str(tmp_path), "num_speculative_tokens": 2})


# ---- sampling keeps the target distribution -------------------------------------------------------
V, SAMPLES = 16, 3000


@pytest.fixture(scope="module")
def small_vocab():
    """Top probabilities ~0.2-0.35: neither flat nor nearly greedy, so drafts get accepted and rejected."""
    model = Transformer(preset("tiny", vocab_size=V, eos_token_id=(0,))).eval()
    g = torch.Generator().manual_seed(11)
    for p in model.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.12, generator=g)
    return model


def _exact_marginals(model: Transformer, prompt: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact distributions of the 2nd and 3rd sampled tokens at temperature 1 (summed over paths)."""
    with torch.no_grad():
        p1 = torch.softmax(model(torch.tensor([prompt]))[0, -1].double(), -1)  # (V,)
        x2 = torch.tensor([prompt + [a] for a in range(V)])
        p2 = torch.softmax(model(x2)[:, -1].double(), -1)  # (V, V): p(t2 | t1)
        x3 = torch.tensor([prompt + [a, b] for a in range(V) for b in range(V)])
        p3 = torch.softmax(model(x3)[:, -1].double(), -1).view(V, V, V)  # p(t3 | t1, t2)
    joint12 = p1[:, None] * p2
    return joint12.sum(0), (joint12[..., None] * p3).sum((0, 1))


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_seeded_sampling_keeps_the_target_distribution(small_vocab, method, tmp_path) -> None:
    prompt = [1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2, 3]
    if method == "ngram":
        spec = NGRAM
    else:
        torch.manual_seed(12)
        ember.save_model(Transformer(preset("tiny", vocab_size=V, num_layers=1)).eval(), tmp_path)
        spec = {"method": "draft_model", "model": str(tmp_path), "num_speculative_tokens": 2}
    llm = LLM(small_vocab, speculative_config=spec, num_kv_blocks=2048, block_size=8, max_num_seqs=256)
    params = [SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True, seed=s) for s in range(SAMPLES)]
    outs = llm.generate([prompt] * SAMPLES, params)
    s = llm.engine.stats()
    assert s.spec_decode_num_accepted_tokens > 0 and s.spec_decode_num_draft_tokens > s.spec_decode_num_accepted_tokens
    want2, want3 = _exact_marginals(small_vocab, prompt)
    for pos, want in ((1, want2), (2, want3)):
        counts = torch.bincount(torch.tensor([o.outputs[0].token_ids[pos] for o in outs]), minlength=V).double()
        keep = want * SAMPLES >= 5  # chi-square needs expected counts of ~5+: pool the rare tokens
        obs, exp = counts[keep], want[keep] * SAMPLES
        if not bool(keep.all()):
            obs, exp = torch.cat([obs, counts[~keep].sum()[None]]), torch.cat([exp, want[~keep].sum()[None] * SAMPLES])
        assert float(chisquare(obs.numpy(), exp.numpy()).pvalue) > 1e-3, (method, pos, obs, exp)
    again = llm.generate([prompt] * 4, params[:4])  # seeded: the same tokens on a rerun
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in outs[:4]]


@pytest.mark.parametrize("family", ["mistral-sliding-window", "falcon-rw-alibi", "gemma3-interleaved"])
def test_greedy_is_identical_across_families(family, tmp_path) -> None:
    """Sliding windows, ALiBi (no native decode kernel) and Gemma 3's interleaved layers: each
    verified position attends as a decode query would."""
    from tests.hf_models import make_hf_model

    make_hf_model(family, tmp_path)
    model = ember.load_model(tmp_path)
    prompts = _prompts(128)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in LLM(model, num_kv_blocks=256, block_size=8).generate(prompts, params)]
    spec = LLM(model, speculative_config=NGRAM, num_kv_blocks=256, block_size=8)
    assert [o.outputs[0].token_ids for o in spec.generate(prompts, params)] == want
    assert spec.engine.stats().spec_decode_num_draft_tokens > 0
    _pool_whole(spec)


def test_each_step_keeps_only_blocks_of_accepted_tokens(model) -> None:
    """After every step: a running request's table covers its computed tokens (and at most the
    next one), nothing more, and every hashed block of it is full of its real (accepted) tokens."""
    from ember.engine.kv_cache import hash_block

    llm = LLM(model, speculative_config=NGRAM, num_kv_blocks=256, block_size=4)
    engine, kv = llm.engine, llm.engine.kv
    for i, p in enumerate(_prompts(128)[:6]):
        engine.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    rejected_steps = 0
    while engine.has_unfinished():
        before = engine.spec.num_draft_tokens - engine.spec.num_accepted_tokens
        engine.step()
        rejected_steps += engine.spec.num_draft_tokens - engine.spec.num_accepted_tokens > before
        for req in engine.scheduler.running:
            table = kv.block_table(req.request_id)
            assert req.spec_token_ids == [] and req.num_computed_tokens == req.num_tokens - 1
            # a plain decode step leaves ceil(computed / bs) blocks; a verification may keep the
            # block where the next token goes
            assert -(-req.num_computed_tokens // 4) <= len(table) <= -(-(req.num_computed_tokens + 1) // 4)
            parent = b""
            for j, b in enumerate(table):
                if kv.block_hash[b] is not None:
                    parent = hash_block(parent, req.token_ids[j * 4:(j + 1) * 4])
                    assert (j + 1) * 4 <= req.num_computed_tokens and kv.block_hash[b] == parent
        kv.check_invariants()
    assert rejected_steps > 0
    assert kv.num_free_blocks == kv.num_blocks


def test_parallel_engines_refuse_speculation_in_one_line() -> None:
    from ember.engine.config import EngineConfig, EngineConfigError

    with pytest.raises(EngineConfigError, match="speculative_config with tensor or pipeline parallel is not supported"):
        EngineConfig(speculative_config=NGRAM, tensor_parallel_size=2)
