"""`ember serve` over the real model (SmolLM2-135M-Instruct) with the official `openai` client: a
json_schema answer, and a tool call round trip (required, streamed, the tool message's turn)."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

import ember
from ember.serve import create_app, running

pytest.importorskip("llguidance")

WEATHER = {"type": "object", "properties": {"city": {"type": "string"},
                                            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                           "parameters": WEATHER}}]
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]


@pytest.fixture(scope="module")
def client(smollm2, smollm2_file):
    app = create_app(smollm2, ember.load_tokenizer(smollm2_file), served_model_name="smollm2", log_interval=0,
                     kv_cache_memory=0.25, max_num_seqs=8)
    with running(app) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)


def test_json_schema_answer(client) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
                                               "hobbies": {"type": "array", "items": {"type": "string"},
                                                           "maxItems": 3}},
              "required": ["name", "age", "hobbies"], "additionalProperties": False}
    kwargs = dict(model="smollm2", temperature=0, max_tokens=120,
                  messages=[{"role": "user", "content": "Invent a person and describe them as JSON."}],
                  response_format={"type": "json_schema",
                                   "json_schema": {"name": "person", "schema": schema, "strict": True}})
    r = client.chat.completions.create(**kwargs)
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs)
                       if c.choices)
    assert streamed == r.choices[0].message.content


def test_tool_call_round_trip(client) -> None:
    kwargs = dict(model="smollm2", messages=ASK, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=120)
    r = client.chat.completions.create(**kwargs).choices[0]
    assert r.finish_reason == "tool_calls" and r.message.tool_calls
    for call in r.message.tool_calls:
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    # streamed deltas reassemble to the same calls
    calls: dict[int, dict] = {}
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            c = calls.setdefault(tc.index, {"name": "", "arguments": ""})
            c["name"] += tc.function.name or ""
            c["arguments"] += tc.function.arguments or ""
    assert [(c["name"], c["arguments"]) for c in calls.values()] == \
        [(c.function.name, c.function.arguments) for c in r.message.tool_calls]
    # the follow-up turn: the assistant's call and the tool's result go back through the template
    history = ASK + [r.message.model_dump(exclude_none=True)] + [
        {"role": "tool", "tool_call_id": c.id, "content": json.dumps({"temperature": 18, "sky": "cloudy"})}
        for c in r.message.tool_calls]
    follow = client.chat.completions.create(model="smollm2", messages=history, tools=TOOLS, temperature=0,
                                            max_tokens=40).choices[0]
    assert follow.finish_reason in ("stop", "length", "tool_calls")
    assert follow.message.content or follow.message.tool_calls
