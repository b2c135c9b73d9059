"""Tool-call parsers on the formats the model families emit, whole and as streams."""

from __future__ import annotations

import json

import pytest

from ember.serve.tool_parsers import HermesParser, Llama3JsonParser, MistralParser, ToolParserError, tool_parser

WEATHER = {"city": "Paris", "unit": "C"}


@pytest.mark.parametrize("parser, text, content, calls", [
    (HermesParser(), 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}'
                     '\n</tool_call>', "Let me check.\n", [("get_weather", WEATHER)]),
    (HermesParser(), '<tool_call>{"name": "a", "arguments": {}}</tool_call>\n<tool_call>{"name": "b", "arguments": '
                     '{"x": 1}}</tool_call>', None, [("a", {}), ("b", {"x": 1})]),
    (HermesParser(), '<tool_call>{"name": "a", "arguments": {"x": 1}}', None, [("a", {"x": 1})]),  # cut at EOS
    (HermesParser(), "no calls here", "no calls here", []),
    (HermesParser(), "<tool_call>{not json}</tool_call>", "<tool_call>{not json}</tool_call>", []),
    (Llama3JsonParser(), '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "C"}}', None,
     [("get_weather", WEATHER)]),
    (Llama3JsonParser(), '<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": 1}}', None,
     [("a", {}), ("b", {"x": 1})]),
    (Llama3JsonParser(), "Paris is sunny.", "Paris is sunny.", []),
    (Llama3JsonParser(), '{"city": "Paris"}', '{"city": "Paris"}', []),
    (MistralParser(), '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}]', None,
     [("get_weather", WEATHER)]),
    (MistralParser(), 'Sure. [TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "C"}', "Sure. ",
     [("get_weather", WEATHER)]),
    (MistralParser(), "[TOOL_CALLS] oops", "[TOOL_CALLS] oops", []),
])
def test_parse(parser, text, content, calls) -> None:
    got_content, got = parser.parse(text)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got] == calls


@pytest.mark.parametrize("parser, text", [
    (HermesParser(), 'Checking <tool_call>{"name": "a", "arguments": {}}</tool_call>'),
    (MistralParser(), 'Checking [TOOL_CALLS][{"name": "a", "arguments": {}}]'),
    (Llama3JsonParser(), '{"name": "a", "parameters": {}}'),
    (Llama3JsonParser(), "Plain answer, no call."),
])
def test_streamed_content_never_shows_a_call(parser, text) -> None:
    """Character by character, content_end never passes the start of a call and never goes back."""
    at = parser.content_end(text)
    last = 0
    for i in range(1, len(text) + 1):
        end = parser.content_end(text[:i])
        assert last <= end <= at or (end == i and at == len(text))
        last = max(last, end)


def test_parser_choice() -> None:
    assert tool_parser("mistral").name == "mistral"
    assert tool_parser(None, "{% for m in messages %}[TOOL_CALLS]{% endfor %}").name == "mistral"
    assert tool_parser(None, "<|python_tag|>").name == "llama3_json"
    assert tool_parser(None, "{{ '<tool_call>' }}").name == "hermes"
    assert tool_parser(None, None).name == "hermes"
    with pytest.raises(ToolParserError, match="hermes, llama3_json, mistral"):
        tool_parser("qwen9")
