"""Constrained decoding in the engine: schemas, regex, choice, grammars, masks, batches, errors.

The tiny random model has no idea what JSON is, so every valid output here is the mask's doing;
tests/engine/test_real_model.py checks the same on SmolLM2.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

pytest.importorskip("llguidance")

from ember.engine import LLM, SamplingParams  # noqa: E402
from ember.engine.grammar import GrammarError  # noqa: E402
from ember.engine.sampling_params import SamplingParamsError  # noqa: E402
from ember.engine.structured_outputs import StructuredOutputsError, StructuredOutputsParams  # noqa: E402
from ember.engine.token_mask import unpack_mask  # noqa: E402
from tests.engine.json_schemas import SCHEMAS  # noqa: E402

SO = StructuredOutputsParams


def _whole(llm: LLM) -> None:
    kv = llm.engine.kv
    kv.check_invariants()
    assert kv.num_free_blocks == kv.num_blocks and not llm.engine.scheduler.running


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_schema_output_parses_and_validates(tiny, temperature) -> None:
    model, tok = tiny
    llm = LLM(model, tok, max_num_seqs=32)
    params = [SamplingParams(temperature=temperature, seed=i, max_tokens=256, structured_outputs=SO(json=s))
              for i, s in enumerate(SCHEMAS)]
    outs = llm.generate(["Answer in JSON:"] * len(SCHEMAS), params)
    for schema, out in zip(SCHEMAS, outs):
        c = out.outputs[0]
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), schema)
    _whole(llm)


def test_json_object_regex_choice_and_grammar(tiny) -> None:
    model, tok = tiny
    llm = LLM(model, tok)
    cases = [
        (SO(regex=r"[0-9]{3}-[A-Z]{2}"), lambda t: re.fullmatch(r"[0-9]{3}-[A-Z]{2}", t)),
        (SO(choice=["yes", "no", 'a "quoted" \\ choice']), lambda t: t in ("yes", "no", 'a "quoted" \\ choice')),
        (SO(grammar='start: "(" num ("," num)* ")"\nnum: /[0-9]/'), lambda t: re.fullmatch(r"\(\d(,\d)*\)", t)),
        (SO(grammar='root ::= "x" [a-c]{2,3}'), lambda t: re.fullmatch(r"x[a-c]{2,3}", t)),  # GBNF
    ]
    for seed in range(3):
        outs = llm.generate(["Q:"] * len(cases), [SamplingParams(temperature=1.0, seed=seed, max_tokens=64,
                                                                 structured_outputs=so) for so, _ in cases])
        for (so, ok), out in zip(cases, outs):
            assert out.outputs[0].finish_reason == "stop" and ok(out.outputs[0].text), (so.kind, out.outputs[0].text)
    # any object: a random model's free keys and strings may run long, so greedy and a long budget
    c = llm.generate("Q:", SamplingParams(temperature=0, max_tokens=512, structured_outputs=SO(json_object=True)))
    assert c[0].outputs[0].finish_reason == "stop" and isinstance(json.loads(c[0].outputs[0].text), dict)


def test_streamed_output_equals_whole_output(tiny) -> None:
    model, tok = tiny
    llm = LLM(model, tok)
    params = [SamplingParams(temperature=0.8, seed=i, max_tokens=128, structured_outputs=SO(json=s), logprobs=2)
              for i, s in enumerate(SCHEMAS[:6])]
    whole = llm.generate(["JSON:"] * 6, params)
    engine = llm.engine
    for i, p in enumerate(params):
        engine.add_request(f"s{i}", "JSON:", p, stream=True)
    text = {f"s{i}": "" for i in range(6)}
    ids = {f"s{i}": [] for i in range(6)}
    while engine.has_unfinished():
        for out in engine.step():
            text[out.request_id] += out.outputs[0].text
            ids[out.request_id] += out.outputs[0].token_ids
    for i, w in enumerate(whole):
        assert text[f"s{i}"] == w.outputs[0].text and ids[f"s{i}"] == w.outputs[0].token_ids


def test_free_requests_are_unchanged_by_constrained_neighbours(tiny) -> None:
    model, tok = tiny
    prompts = ["The list type", "def f(x):", "Grüße aus", "A"]
    free = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    alone = LLM(model, tok).generate(prompts, free)
    mixed_llm = LLM(model, tok)
    constrained = [SamplingParams(temperature=0, max_tokens=64, structured_outputs=SO(json=s)) for s in SCHEMAS[:4]]
    mixed = mixed_llm.generate([p for pair in zip(prompts, prompts) for p in pair],
                               [p for pair in zip([free] * 4, constrained) for p in pair])
    assert [o.outputs[0].token_ids for o in mixed[::2]] == [o.outputs[0].token_ids for o in alone]
    _whole(mixed_llm)


def test_logprobs_are_of_the_masked_distribution(tiny) -> None:
    model, tok = tiny
    llm = LLM(model, tok)
    choices = ["alpha", "beta", "gamma"]
    c = llm.generate("Pick:", SamplingParams(temperature=0, max_tokens=8, logprobs=20,
                                             structured_outputs=SO(choice=choices)))[0].outputs[0]
    assert c.text in choices
    first = c.logprobs[0]
    allowed_starts = [tok.decode([t]) for t in first]
    # only tokens that begin a choice get a finite logprob, and their mass is the whole distribution
    finite = [lp for lp in first.values() if lp.logprob > float("-inf")]
    assert all(any(ch.startswith(s) for ch in choices) for s, lp in zip(allowed_starts, first.values())
               if lp.logprob > float("-inf"))
    assert sum(torch.tensor([lp.logprob for lp in finite]).exp().tolist()) == pytest.approx(1.0, abs=1e-4)


def test_n_samples_each_follow_the_grammar(tiny) -> None:
    model, tok = tiny
    llm = LLM(model, tok)
    out = llm.generate("JSON:", SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=128,
                                               structured_outputs=SO(json=SCHEMAS[0])))[0]
    assert len(out.outputs) == 4
    for c in out.outputs:
        jsonschema.validate(json.loads(c.text), SCHEMAS[0])
    _whole(llm)


def test_a_grammar_that_cannot_compile_fails_alone(tiny) -> None:
    model, tok = tiny
    llm = LLM(model, tok)
    engine = llm.engine
    engine.add_request("good", "JSON:", SamplingParams(temperature=0, max_tokens=64,
                                                       structured_outputs=SO(json=SCHEMAS[1])))
    engine.step()
    for bad, words in [(SO(regex="a(b"), "unclosed group"), (SO(grammar="start: foo"), "unknown name"),
                       (SO(json={"type": "strin"}), "strin")]:
        with pytest.raises(GrammarError, match=words):
            engine.add_request("bad", "JSON:", SamplingParams(structured_outputs=bad))
        assert "bad" not in engine.groups
    done = []
    while engine.has_unfinished():
        done += [o for o in engine.step() if o.finished]
    jsonschema.validate(json.loads(done[0].outputs[0].text), SCHEMAS[1])


@pytest.mark.parametrize("kwargs, words", [
    ({}, "set exactly one"),
    ({"regex": "a", "choice": ["a"]}, "got regex, choice"),
    ({"json": "{not json"}, "not valid JSON"),
    ({"json": [1]}, "must be an object"),
    ({"choice": []}, "non-empty list"),
    ({"choice": ["a", 3]}, "non-empty list"),
    ({"regex": ""}, "non-empty string"),
])
def test_malformed_constraints_name_the_field(kwargs, words) -> None:
    with pytest.raises(StructuredOutputsError, match=words):
        SO(**kwargs)
    with pytest.raises(SamplingParamsError, match=words):
        SamplingParams(structured_outputs=kwargs)


def test_unpack_mask_matches_llguidance(tiny) -> None:
    import llguidance

    model, tok = tiny
    llm = LLM(model, tok)
    matcher = llm.engine.grammars.compile(SO(regex=r"[a-f]+"))
    raw = torch.frombuffer(bytearray(matcher.compute_bitmask()), dtype=torch.int32)[None]
    allowed = unpack_mask(raw, tok.vocab_size)[0]
    expected = [t for t in range(tok.vocab_size) if matcher.validate_tokens([t]) == 1]
    assert allowed.nonzero().squeeze(1).tolist() == expected
    assert isinstance(matcher, llguidance.LLMatcher)


def test_a_complete_grammar_ends_the_request_even_with_ignore_eos(tiny) -> None:
    model, tok = tiny
    llm = LLM(model, tok)
    for ignore_eos in (False, True):
        c = llm.generate("Q:", SamplingParams(temperature=1.0, seed=1, max_tokens=50, ignore_eos=ignore_eos,
                                              structured_outputs=SO(choice=["alpha", "beta"])))[0].outputs[0]
        assert c.text in ("alpha", "beta") and c.finish_reason == "stop" and c.stop_reason is None
    _whole(llm)


def test_constrained_requests_survive_preemption(tiny) -> None:
    """A pool too small for the batch preempts (recomputes) requests; their matchers stay in step."""
    model, tok = tiny
    llm = LLM(model, tok, num_kv_blocks=12, max_num_seqs=8)
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=40, structured_outputs=SO(json=SCHEMAS[7]))
              for i in range(8)]
    outs = llm.generate(["A longer prompt that takes a few blocks of the pool"] * 8, params)
    assert llm.engine.scheduler.num_preemptions > 0
    for out in outs:
        jsonschema.validate(json.loads(out.outputs[0].text), SCHEMAS[7])
    _whole(llm)


def test_children_fork_only_after_the_masks_are_done(tiny, monkeypatch) -> None:
    """A fork copies its parent's matcher, which the mask thread may be reading: it must wait."""
    from ember.engine.request import Request

    model, tok = tiny
    llm = LLM(model, tok)
    futures = []
    start, fork = llm.engine.masker.start, Request.fork

    class Awaited:  # "done" once the engine has waited for it, whatever the thread's timing
        def __init__(self, future):
            self.future, self.waited = future, False

        def result(self):
            self.waited = True
            return self.future.result()

    def recording_start(matchers):
        futures.append(Awaited(start(matchers)))
        return futures[-1]

    def checked_fork(self, index):
        assert futures and futures[-1].waited
        return fork(self, index)

    monkeypatch.setattr(llm.engine.masker, "start", recording_start)
    monkeypatch.setattr(Request, "fork", checked_fork)
    out = llm.generate("JSON:", SamplingParams(n=3, temperature=1.0, seed=2, max_tokens=64,
                                               structured_outputs=SO(json=SCHEMAS[1])))[0]
    assert len(out.outputs) == 3 and futures
