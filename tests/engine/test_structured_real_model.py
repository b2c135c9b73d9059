"""Constrained decoding on the real model (SmolLM2-135M-Instruct): all 22 schemas validate, greedy
and sampled, and free requests batched with constrained ones keep their greedy tokens."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

import ember
from ember.engine import LLM, SamplingParams, StructuredOutputsParams
from tests.engine.json_schemas import SCHEMAS

pytest.importorskip("llguidance")


@pytest.fixture(scope="module")
def llm(smollm2, smollm2_file) -> LLM:
    return LLM(smollm2, ember.load_tokenizer(smollm2_file), max_num_seqs=32, kv_cache_memory=0.5)


def _ask(schema: dict) -> list[dict]:
    return [{"role": "user", "content": "Reply with JSON that follows this schema: " + json.dumps(schema)}]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_every_schema_validates_on_smollm2(llm, temperature) -> None:
    params = [SamplingParams(temperature=temperature, seed=i, max_tokens=200,
                             structured_outputs=StructuredOutputsParams(json=s)) for i, s in enumerate(SCHEMAS)]
    outs = llm.chat([_ask(s) for s in SCHEMAS], params)
    for schema, out in zip(SCHEMAS, outs):
        c = out.outputs[0]
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), schema)


def test_regex_and_choice_on_smollm2(llm) -> None:
    q = [{"role": "user", "content": "Is the sky blue? Then give a date."}]
    outs = llm.chat([q, q], [SamplingParams(temperature=0, max_tokens=20, structured_outputs=StructuredOutputsParams(
        choice=["yes", "no"])), SamplingParams(temperature=0, max_tokens=20, structured_outputs=StructuredOutputsParams(
            regex=r"20[0-9]{2}-[01][0-9]-[0-3][0-9]"))])
    assert outs[0].outputs[0].text in ("yes", "no")
    assert re.fullmatch(r"20[0-9]{2}-[01][0-9]-[0-3][0-9]", outs[1].outputs[0].text)


def test_free_requests_keep_their_tokens_beside_constrained_ones(llm) -> None:
    free = [[{"role": "user", "content": q}] for q in ("What is a tuple?", "Name a color.", "Say hello.")]
    p = SamplingParams(temperature=0, max_tokens=24)
    alone = [o.outputs[0].token_ids for o in llm.chat(free, p)]
    constrained = [SamplingParams(temperature=0, max_tokens=64, structured_outputs=StructuredOutputsParams(json=s))
                   for s in SCHEMAS[:3]]
    mixed = llm.chat(free + [_ask(s) for s in SCHEMAS[:3]], [p] * 3 + constrained)
    assert [o.outputs[0].token_ids for o in mixed[:3]] == alone
