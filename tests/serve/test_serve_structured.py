"""Structured outputs through the server, with the official `openai` client: response_format
json_object / json_schema, vLLM's structured_outputs and guided_* fields on both routes, streams
equal to whole responses, and a grammar that cannot compile failing alone with a 400."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel

from tests.engine.json_schemas import SCHEMAS

pytest.importorskip("llguidance")

MSG = [{"role": "user", "content": "Answer in JSON."}]


def test_json_schema_response_format_validates_for_every_schema(client) -> None:
    def ask(i_schema):
        i, schema = i_schema
        r = client.chat.completions.create(
            model="tiny", messages=MSG, max_tokens=256, temperature=1.0, seed=i,
            response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}})
        return schema, r.choices[0]

    with ThreadPoolExecutor(8) as pool:
        for schema, choice in pool.map(ask, enumerate(SCHEMAS)):
            assert choice.finish_reason == "stop"
            jsonschema.validate(json.loads(choice.message.content), schema)


def test_json_object_and_the_clients_parse_helper(client) -> None:
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=400, temperature=0,
                                       response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)

    class Point(BaseModel):
        x: int
        y: int
        label: str

    parsed = client.chat.completions.parse(model="tiny", messages=MSG, max_tokens=200, temperature=0,
                                           response_format=Point)
    assert isinstance(parsed.choices[0].message.parsed, Point)


@pytest.mark.parametrize("field, value, ok", [
    ("guided_regex", r"[0-9]{2}-[a-z]{3}", lambda t: re.fullmatch(r"[0-9]{2}-[a-z]{3}", t)),
    ("guided_choice", ["left", "right"], lambda t: t in ("left", "right")),
    ("guided_grammar", 'start: "<" ("a" | "b")+ ">"', lambda t: re.fullmatch(r"<[ab]+>", t)),
    ("guided_json", SCHEMAS[7], lambda t: jsonschema.validate(json.loads(t), SCHEMAS[7]) or True),
    ("structured_outputs", {"choice": ["up", "down"]}, lambda t: t in ("up", "down")),
    ("structured_outputs", {"regex": "x+y"}, lambda t: re.fullmatch("x+y", t)),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMAS[1]}},
     lambda t: jsonschema.validate(json.loads(t), SCHEMAS[1]) or True),
])
def test_vllm_fields_on_both_routes(client, field, value, ok) -> None:
    for seed in range(2):
        c = client.completions.create(model="tiny", prompt="Q:", max_tokens=64, temperature=1.0, seed=seed, n=2,
                                      extra_body={field: value})
        for choice in c.choices:
            assert choice.finish_reason == "stop" and ok(choice.text), choice.text
        r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=64, temperature=1.0, seed=seed,
                                           extra_body={field: value})
        assert ok(r.choices[0].message.content), r.choices[0].message.content


def test_streamed_equals_whole(client) -> None:
    kwargs = dict(model="tiny", messages=MSG, max_tokens=128, temperature=0.9, seed=11, logprobs=True,
                  response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMAS[8]}})
    whole = client.chat.completions.create(**kwargs).choices[0]
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.message.content
    streamed_lps = [t.token for c in chunks if c.choices and c.choices[0].logprobs
                    for t in c.choices[0].logprobs.content]
    assert streamed_lps == [t.token for t in whole.logprobs.content]
    c = client.completions.create(model="tiny", prompt="Q:", max_tokens=64, temperature=0.9, seed=3,
                                  extra_body={"guided_json": SCHEMAS[0]})
    streamed = client.completions.create(model="tiny", prompt="Q:", max_tokens=64, temperature=0.9, seed=3,
                                         stream=True, extra_body={"guided_json": SCHEMAS[0]})
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == c.choices[0].text


BAD = [  # (body fields, status, words in the message, param)
    ({"guided_regex": "a(b"}, 400, "unclosed group", None),
    ({"guided_grammar": "start: nothing_here"}, 400, "unknown name", None),
    ({"guided_json": {"type": "strin"}}, 400, "strin", None),
    ({"guided_json": "{not json"}, 400, "not valid json", "guided_json"),
    ({"guided_choice": []}, 400, "at least 1 item", "guided_choice"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, 400, "several", "guided_choice"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, 400, "exactly one", "structured_outputs"),
    ({"structured_outputs": {}}, 400, "exactly one", "structured_outputs"),
    ({"response_format": {"type": "json_schema"}}, 400, "json_schema", "response_format"),
    ({"response_format": {"type": "xml"}}, 400, "response_format", "response_format.type"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, 400, "several", "guided_regex"),
]


@pytest.mark.parametrize("fields, status, words, param", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_constraints_are_clear_400s(server, fields, status, words, param) -> None:
    for path, body in (("/v1/completions", {"prompt": "x"}), ("/v1/chat/completions", {"messages": MSG})):
        r = httpx.post(server.url + path, json={**body, **fields}, timeout=60)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert words.lower() in err["message"].lower() and err["param"] == param, err


def test_a_bad_grammar_does_not_disturb_the_batch(client, server) -> None:
    def good(seed):
        return client.completions.create(model="tiny", prompt="Q:", max_tokens=64, temperature=1.0, seed=seed,
                                         extra_body={"guided_json": SCHEMAS[1]}).choices[0].text

    def bad(_):
        with pytest.raises(openai.BadRequestError, match="unclosed group"):
            client.completions.create(model="tiny", prompt="Q:", max_tokens=8, extra_body={"guided_regex": "(a"})

    with ThreadPoolExecutor(6) as pool:
        goods = [pool.submit(good, s) for s in range(4)]
        list(pool.map(bad, range(4)))
        for f in goods:
            jsonschema.validate(json.loads(f.result()), SCHEMAS[1])
    assert server.serving.engine.errored is None
