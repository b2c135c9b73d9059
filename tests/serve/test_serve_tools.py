"""Tool calling through the official `openai` client on the tiny model: required and named choices
are constrained by the parameter schemas, auto replies are parsed, streams reassemble to the same
calls, and the follow-up turn with the `tool` message renders through the template."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

pytest.importorskip("llguidance")

# small schemas: the tiny model's 512-token context holds the tool prompt and the reply
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["C", "F"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
MSG = [{"role": "user", "content": "What is the weather in Paris?"}]


def _check_calls(calls) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def _reassemble(chunks) -> tuple[str, list[dict], str | None]:
    """Content, tool calls and finish reason from a chat stream, as a client would build them."""
    content, calls, finish = "", {}, None
    for chunk in chunks:
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        content += d.content or ""
        for tc in d.tool_calls or []:
            call = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
            call["id"] = tc.id or call["id"]
            if tc.function is not None:
                call["name"] = tc.function.name or call["name"]
                call["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


def test_required_returns_valid_calls_whole_and_streamed(client) -> None:
    # parallel_tool_calls=False (at most one call): a random model would append calls until the tiny
    # context ends; the real-model test (test_serve_real_model.py) lets it make several
    for seed in range(4):
        kwargs = dict(model="tiny", messages=MSG, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                      temperature=1.0, seed=seed)
        r = client.chat.completions.create(**kwargs).choices[0]
        assert r.finish_reason == "tool_calls" and r.message.content is None, r.message.content
        assert len(r.message.tool_calls) == 1
        _check_calls(r.message.tool_calls)
        content, calls, finish = _reassemble(client.chat.completions.create(stream=True, **kwargs))
        assert content == "" and finish == "tool_calls"
        assert [(c["name"], c["arguments"]) for c in calls] == \
            [(c.function.name, c.function.arguments) for c in r.message.tool_calls]
        assert all(c["id"] for c in calls)


def test_named_function_whole_and_streamed(client) -> None:
    choice = {"type": "function", "function": {"name": "get_time"}}
    kwargs = dict(model="tiny", messages=MSG, tools=TOOLS, tool_choice=choice, temperature=1.0, seed=2)
    r = client.chat.completions.create(**kwargs).choices[0]
    assert [c.function.name for c in r.message.tool_calls] == ["get_time"] and r.finish_reason == "stop"
    _check_calls(r.message.tool_calls)
    content, calls, finish = _reassemble(client.chat.completions.create(stream=True, **kwargs))
    assert [(c["name"], c["arguments"]) for c in calls] == [("get_time", r.message.tool_calls[0].function.arguments)]
    assert finish == "stop" and content == ""


def test_auto_parses_a_hermes_reply_whole_and_streamed(client) -> None:
    # The random model cannot choose to call, so a regex makes it write a Hermes reply; the parse is real.
    reply = (r'Checking\.\n<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "Oslo", "unit": "C"\}\}'
             r'\n</tool_call>')
    kwargs = dict(model="tiny", messages=MSG, tools=TOOLS, temperature=0,
                  extra_body={"guided_regex": reply})
    r = client.chat.completions.create(**kwargs).choices[0]
    assert r.message.content == "Checking.\n" and r.finish_reason == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in r.message.tool_calls] == \
        [("get_weather", {"city": "Oslo", "unit": "C"})]
    content, calls, finish = _reassemble(client.chat.completions.create(stream=True, **kwargs))
    assert content == "Checking.\n" and finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls] == [("get_weather", r.message.tool_calls[0].function.arguments)]


def test_auto_without_parallel_calls_keeps_the_first(client) -> None:
    call = r'<tool_call>\{"name": "get_time", "arguments": \{"zone": "ZONE"\}\}</tool_call>'
    two = call.replace("ZONE", "UTC") + call.replace("ZONE", "CET")
    for parallel, zones in ((True, ["UTC", "CET"]), (False, ["UTC"])):
        r = client.chat.completions.create(model="tiny", messages=MSG, tools=TOOLS[1:], temperature=0,
                                           parallel_tool_calls=parallel, extra_body={"guided_regex": two})
        assert [json.loads(c.function.arguments)["zone"] for c in r.choices[0].message.tool_calls or []] == zones, \
            (r.choices[0].message.content, r.choices[0].finish_reason)


def test_auto_without_a_call_is_plain_content(client) -> None:
    kwargs = dict(model="tiny", messages=MSG, tools=TOOLS, max_tokens=20, temperature=0)
    r = client.chat.completions.create(**kwargs).choices[0]
    assert r.message.tool_calls is None and r.finish_reason in ("stop", "length")
    content, calls, _ = _reassemble(client.chat.completions.create(stream=True, **kwargs))
    assert content == r.message.content and calls == []


def test_follow_up_turn_with_the_tool_message(client, server) -> None:
    first = client.chat.completions.create(model="tiny", messages=MSG, tools=TOOLS[1:], tool_choice="required",
                                           parallel_tool_calls=False, temperature=0).choices[0].message
    call = first.tool_calls[0]
    history = MSG + [first.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp": 21})}]
    r = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS[1:], max_tokens=8, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # the tool result and the earlier call are in the prompt the template rendered
    ids = httpx.post(server.url + "/tokenize", json={"messages": history, "tools": TOOLS[1:]}).json()["tokens"]
    text = server.serving.tokenizer.decode(ids)
    assert '{"temp": 21}' in text and call.function.name in text and "<tools>" in text


def test_tool_choice_none_keeps_tools_out_of_the_prompt(client) -> None:
    plain = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=4, temperature=0)
    none = client.chat.completions.create(model="tiny", messages=MSG, tools=TOOLS, tool_choice="none", max_tokens=4,
                                          temperature=0)
    auto = client.chat.completions.create(model="tiny", messages=MSG, tools=TOOLS, max_tokens=4, temperature=0)
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens < auto.usage.prompt_tokens
    assert none.choices[0].message.content == plain.choices[0].message.content


@pytest.mark.parametrize("fields, words, param", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not in tools", "tool_choice"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format", "tool_choice"),
    ({"tool_choice": "required", "guided_regex": "a+"}, "already constrains", "tool_choice"),
    ({"tool_choice": "sometimes"}, "tool_choice", "tool_choice"),
    ({"tools": TOOLS + TOOLS[:1]}, "unique", "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name", None),
])
def test_bad_tool_requests_are_clear_400s(client, fields, words, param) -> None:
    body = {"model": "tiny", "messages": MSG, "tools": TOOLS, "max_tokens": 4, **fields}
    extra = {k: body.pop(k) for k in list(body) if k.startswith("guided_")}  # vLLM's: not the client's kwargs
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**body, extra_body=extra)
    err = e.value.body
    assert words.lower() in err["message"].lower()
    if param is not None:
        assert err["param"] == param


def test_tool_choice_without_tools(client) -> None:
    with pytest.raises(openai.BadRequestError, match="needs tools"):
        client.chat.completions.create(model="tiny", messages=MSG, tool_choice="required", max_tokens=4)


def test_history_arguments_that_are_not_json_render_as_text(client, server) -> None:
    """OpenAI keeps arguments as opaque text; the template gets the string rather than a 400."""
    history = MSG + [{"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
        "name": "get_time", "arguments": "zone=UTC"}}]}, {"role": "tool", "tool_call_id": "c1", "content": "12:00"}]
    ids = httpx.post(server.url + "/tokenize", json={"messages": history}).json()["tokens"]
    assert "zone=UTC" in server.serving.tokenizer.decode(ids)
