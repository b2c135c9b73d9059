"""The offline LLM API: text, stops, lengths, n > 1, seeds, logprobs, abort, errors, metrics."""

from __future__ import annotations

import logging

import pytest
import torch

from ember.engine import LLM, RequestError, SamplingParams
from ember.engine.engine import LLMEngine
from ember.engine.config import EngineConfig

PROMPTS = ["The list type", "def f(x):\n    return", "Grüße aus", "A"]


def _whole(llm: LLM) -> None:
    kv = llm.engine.kv
    kv.check_invariants()
    assert kv.num_free_blocks == kv.num_blocks and not llm.engine.scheduler.running


def test_incremental_text_equals_full_decode(tiny) -> None:
    model, tok = tiny
    llm = LLM(model, tok, max_num_batched_tokens=16, max_num_seqs=16)
    outs = llm.generate(PROMPTS * 2, [SamplingParams(temperature=1.0, seed=i, max_tokens=40) for i in range(8)])
    for prompt, out in zip(PROMPTS * 2, outs):
        assert out.prompt == prompt and out.prompt_token_ids == tok.encode(prompt)
        c = out.outputs[0]
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
        assert c.finish_reason in ("stop", "length")
    _whole(llm)


def _greedy_text(llm: LLM, prompt: str, n: int = 40) -> tuple[str, list[int]]:
    c = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))[0].outputs[0]
    return c.text, c.token_ids


def test_stop_string_across_a_token_boundary_is_cut(tiny) -> None:
    model, tok = tiny
    llm = LLM(model, tok)
    text, ids = _greedy_text(llm, PROMPTS[0])
    # A stop string made of the end of one token and the start of the next.
    for i in range(5, len(ids) - 1):
        left = tok.decode(ids[:i], skip_special_tokens=True)
        stop = left[-2:] + text[len(left):len(left) + 2]
        if len(stop) == 4 and text.find(stop) == len(left) - 2:
            break
    else:
        pytest.skip("no usable token boundary in this generation")
    at = len(left) - 2
    for include in (False, True):
        c = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=40, stop=["zzzz", stop],
                                                    include_stop_str_in_output=include))[0].outputs[0]
        assert c.text == text[:at + (4 if include else 0)]
        assert c.finish_reason == "stop" and c.stop_reason == stop
        assert c.token_ids == ids[:len(c.token_ids)] and len(c.token_ids) <= i + 1
    _whole(llm)


def test_stop_token_ids_eos_min_tokens_and_length(tiny) -> None:
    model, tok = tiny
    llm = LLM(model, tok)
    text, ids = _greedy_text(llm, PROMPTS[1])
    stop_id = ids[6]
    c = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[stop_id]))[0].outputs[0]
    first = ids.index(stop_id)
    assert c.token_ids == ids[:first + 1] and c.stop_reason == stop_id and c.finish_reason == "stop"
    assert c.text == tok.decode(ids[:first], skip_special_tokens=True)  # the stop token's text is not emitted
    eos = tok.eos_token_id
    force_eos = dict(temperature=0, max_tokens=10, logit_bias={eos: 100.0})
    assert llm.generate("x", SamplingParams(**force_eos))[0].outputs[0].token_ids == [eos]
    c = llm.generate("x", SamplingParams(**force_eos, min_tokens=3))[0].outputs[0]
    assert len(c.token_ids) == 4 and c.token_ids[-1] == eos and eos not in c.token_ids[:3]
    c = llm.generate("x", SamplingParams(**force_eos, ignore_eos=True))[0].outputs[0]
    assert c.token_ids == [eos] * 10 and c.finish_reason == "length"
    # max_tokens=None runs to the end of the context.
    short = LLM(model, tok, max_model_len=24)
    c = short.generate("def", SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))[0].outputs[0]
    assert len(tok.encode("def")) + len(c.token_ids) == 24 and c.finish_reason == "length"


def test_seeded_sampling_ignores_batch_composition_and_n_children_use_seed_plus_index(tiny) -> None:
    model, tok = tiny
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=42, max_tokens=24)
    alone = LLM(model, tok).generate(PROMPTS[0], params)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=0.7, max_tokens=n) for n in (5, 30, 12)]
    mixed = LLM(model, tok, seed=9).generate([PROMPTS[2], PROMPTS[0], "zz", PROMPTS[1]],
                                             [others[0], params, others[1], others[2]])
    assert mixed[1].outputs[0].token_ids == alone
    llm = LLM(model, tok)
    group = llm.generate(PROMPTS[1], SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=16))[0]
    assert [c.index for c in group.outputs] == [0, 1, 2]
    for j, c in enumerate(group.outputs):
        single = llm.generate(PROMPTS[1], SamplingParams(temperature=1.0, seed=5 + j, max_tokens=16))[0]
        assert c.token_ids == single.outputs[0].token_ids
    assert len({tuple(c.token_ids) for c in group.outputs}) > 1
    _whole(llm)


@pytest.mark.parametrize("regime", [dict(), dict(max_num_batched_tokens=8, max_num_seqs=8, num_kv_blocks=6, block_size=4)])
def test_logprobs_and_prompt_logprobs_match_the_full_forward(tiny, regime) -> None:
    model, tok = tiny
    llm = LLM(model, tok, **regime)
    prompt = tok.encode("The list type and the dict type")
    outs = llm.generate([prompt, prompt[:5]], SamplingParams(temperature=0, max_tokens=6, logprobs=2,
                                                             prompt_logprobs=1, ignore_eos=True))
    for out, p in zip(outs, [prompt, prompt[:5]]):
        c = out.outputs[0]
        full = p + c.token_ids
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([full]))[0].float(), -1)
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(p)
        for i in range(1, len(p)):
            entry = out.prompt_logprobs[i]
            assert abs(entry[p[i]].logprob - ref[i - 1, p[i]].item()) < 1e-4
            assert len(entry) <= 2 and min(e.rank for e in entry.values()) == 1
        assert len(c.logprobs) == len(c.token_ids)
        for j, t in enumerate(c.token_ids):
            entry = c.logprobs[j]
            assert entry[t].rank == 1 and abs(entry[t].logprob - ref[len(p) - 1 + j, t].item()) < 1e-4
            assert entry[t].decoded_token == tok.decode([t])
        assert abs(c.cumulative_logprob - sum(c.logprobs[j][t].logprob for j, t in enumerate(c.token_ids))) < 1e-4
    _whole(llm)


def test_abort_at_any_time_frees_everything(tiny) -> None:
    model, tok = tiny
    engine = LLMEngine(model, tok, EngineConfig(max_num_seqs=2, max_num_batched_tokens=8))
    for i in range(4):
        engine.add_request(f"r{i}", PROMPTS[i % 4] * 3, SamplingParams(max_tokens=50, n=2 if i == 1 else 1))
    for _ in range(3):
        engine.step()
    running = engine.abort("r0")  # mid-generation
    waiting = engine.abort("r3")  # never scheduled
    assert running.finished and running.outputs[0].finish_reason == "abort"
    assert waiting.finished and waiting.outputs[0].token_ids == []
    assert engine.abort("r0") is None  # unknown now
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id in ("r1", "r2")
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    engine.kv.check_invariants()


def test_requests_that_cannot_be_served_are_clear_errors(tiny) -> None:
    model, tok = tiny
    llm = LLM(model, tok, num_kv_blocks=4, block_size=4, max_model_len=64)
    with pytest.raises(RequestError, match="KV cache holds 16"):
        llm.generate([list(range(3, 20))], SamplingParams())
    big = LLM(model, tok, max_model_len=64)
    with pytest.raises(RequestError, match="context.*64"):
        big.generate([list(range(3, 70))], SamplingParams())
    with pytest.raises(RequestError, match="empty"):
        big.generate([[]], SamplingParams())
    with pytest.raises(RequestError, match="outside the vocabulary"):
        big.generate([[10 ** 6]], SamplingParams())
    with pytest.raises(ValueError, match="stop_token_ids|outside the vocabulary"):
        big.generate(["a"], SamplingParams(stop_token_ids=[10 ** 6]))
    with pytest.raises(RequestError, match="tokenizer"):
        LLM(model).generate(["text needs a tokenizer"], SamplingParams())
    with pytest.raises(RequestError, match="one each"):
        big.generate(["a", "b"], [SamplingParams()])
    # A failing batch leaves nothing behind.
    with pytest.raises(RequestError):
        big.generate(["fine", list(range(3, 70))], SamplingParams())
    assert not big.engine.has_unfinished()
    _whole(big)


def test_metrics_stats_and_startup_log(tiny, caplog) -> None:
    model, tok = tiny
    with caplog.at_level(logging.INFO, logger="ember.engine"):
        llm = LLM(model, tok, num_kv_blocks=64, block_size=8)
    assert "64 blocks x 8 tokens = 512 tokens" in caplog.text and "max concurrent full-length" in caplog.text
    outs = llm.generate([PROMPTS[0] * 4] * 3, SamplingParams(max_tokens=5, ignore_eos=True))
    for out in outs:
        m = out.metrics
        assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time
        assert m.num_generation_tokens == 5 and m.num_prompt_tokens == len(out.prompt_token_ids)
    s = llm.engine.stats()
    assert s.generation_tokens_total == 15 and s.prompt_tokens_total == 3 * len(outs[0].prompt_token_ids)
    assert s.prefix_cache_hits > 0 and s.prefix_cache_queries >= s.prefix_cache_hits
    assert s.num_running == s.num_waiting == 0 and s.kv_cache_usage == 0.0 and s.num_requests_finished == 3
    assert outs[1].num_cached_tokens > 0 or outs[2].num_cached_tokens > 0


@pytest.mark.parametrize("prompt_len", [8, 11])  # a full last block, and a shared partial one (copy-on-write)
def test_forked_sequences_decode_from_the_shared_prompt_blocks(tiny, prompt_len: int) -> None:
    model, tok = tiny
    llm = LLM(model, tok, block_size=4, enable_prefix_caching=False)
    prompt = list(range(5, 5 + prompt_len))
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    single = llm.generate([prompt], greedy)[0].outputs[0].token_ids
    group = llm.generate([prompt], SamplingParams(n=3, temperature=0, max_tokens=10, ignore_eos=True))[0]
    assert [c.token_ids for c in group.outputs] == [single] * 3
    _whole(llm)
