"""Tool-call parsers: a model's reply text -> (content, tool calls), in each model family's format.

    parser = tool_parser("hermes")                      # or tool_parser(None, chat_template): guessed
    content, calls = parser.parse(text)                 # calls: [ParsedCall(name, arguments_json)]
    parser.content_end(text_so_far)                     # how much of a stream is surely content

Formats (what the models are trained to emit):
    hermes       Hermes / Qwen 2.5+ / SmolLM3: <tool_call>{"name": ..., "arguments": {...}}</tool_call>, repeated
    llama3_json  Llama 3.1+: the whole reply is {"name": ..., "parameters": {...}} (optionally after
                 <|python_tag|>, several joined by ";")
    mistral      Mistral: [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...], or v11's
                 [TOOL_CALLS]name[ARGS]{...} (a special token: decoded with special tokens kept)
A reply whose calls do not parse is plain content: nothing is lost, and the client sees what the
model wrote. Arguments are re-serialized JSON text, as OpenAI returns them.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from ember.errors import EmberError


class ToolParserError(EmberError):
    """An unknown --tool-call-parser name."""


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text


def _call(obj: Any, args_key: str) -> ParsedCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(args, str):  # some models write the arguments as a JSON string already
        try:
            args = json.loads(args)
        except ValueError:
            return None
    return ParsedCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _json_values(text: str) -> list[Any] | None:
    """Consecutive JSON values separated by whitespace, ';' or ','; None if anything else is there."""
    dec, at, out = json.JSONDecoder(), 0, []
    while True:
        while at < len(text) and text[at] in " \t\r\n;,":
            at += 1
        if at == len(text):
            return out
        try:
            value, at = dec.raw_decode(text, at)
        except ValueError:
            return None
        out.append(value)


class ToolParser:
    """Base: calls start at `marker`; everything before it is content."""

    name = ""
    marker = ""
    skip_special_tokens = True

    def call_id(self) -> str:
        return f"call_{uuid.uuid4().hex[:24]}"

    def content_end(self, text: str) -> int:
        """Length of the prefix of a partial reply that cannot be part of a tool call."""
        at = text.find(self.marker)
        if at >= 0:
            return at
        for k in range(min(len(self.marker) - 1, len(text)), 0, -1):  # hold back a partial marker
            if self.marker.startswith(text[-k:]):
                return len(text) - k
        return len(text)

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        at = text.find(self.marker)
        if at < 0:
            return text, []
        calls = self._calls(text[at:])
        if not calls:
            return text, []
        return (text[:at] if text[:at].strip() else None), calls  # unstripped: a stream sent it as is

    def _calls(self, text: str) -> list[ParsedCall]:
        raise NotImplementedError


class HermesParser(ToolParser):
    name = "hermes"
    marker = "<tool_call>"
    _BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def _calls(self, text: str) -> list[ParsedCall]:
        calls = []
        for body in self._BLOCK.findall(text):
            try:
                call = _call(json.loads(body), "arguments")
            except ValueError:
                return []
            if call is None:
                return []
            calls.append(call)
        return calls


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    marker = "<|python_tag|>"

    def content_end(self, text: str) -> int:
        head = text.lstrip()
        if not head or head.startswith("{") or self.marker.startswith(head[:len(self.marker)]):
            return 0  # a reply that opens like a call is held until it is known
        return len(text)

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        body = text.strip()
        body = body[len(self.marker):] if body.startswith(self.marker) else body
        if not body.startswith("{"):
            return text, []
        values = _json_values(body)
        calls = [_call(v, "parameters") for v in values or []]
        if not calls or None in calls:
            return text, []
        return None, calls


class MistralParser(ToolParser):
    name = "mistral"
    marker = "[TOOL_CALLS]"
    skip_special_tokens = False  # [TOOL_CALLS] is a special token

    def call_id(self) -> str:
        return uuid.uuid4().hex[:9]  # Mistral's templates require 9 alphanumerics

    def _calls(self, text: str) -> list[ParsedCall]:
        calls: list[ParsedCall] = []
        for part in text.split(self.marker)[1:]:
            part = part.strip().removesuffix("</s>").strip()
            if part.startswith("["):
                values = _json_values(part)
                items = values[0] if values and len(values) == 1 and isinstance(values[0], list) else None
                found = [_call(v, "arguments") for v in items or []]
            else:  # v11: name[ARGS]{...} (or name{...})
                cut = part.find("[ARGS]")
                brace = part.find("{")
                if cut < 0 and brace < 0:
                    return []
                name, args = (part[:cut], part[cut + len("[ARGS]"):]) if cut >= 0 else (part[:brace], part[brace:])
                values = _json_values(args)
                found = [_call({"name": name.strip(), "arguments": values[0]}, "arguments")] \
                    if name.strip() and values and len(values) == 1 else []
            if not found or None in found:
                return []
            calls.extend(found)
        return calls


PARSERS: dict[str, type[ToolParser]] = {p.name: p for p in (HermesParser, Llama3JsonParser, MistralParser)}


def tool_parser(name: str | None, chat_template: str | None = None) -> ToolParser:
    """The parser named (--tool-call-parser), or the one the chat template's format implies."""
    if name is not None:
        if name not in PARSERS:
            raise ToolParserError(f"unknown tool-call parser {name!r}: use one of {', '.join(PARSERS)}")
        return PARSERS[name]()
    template = chat_template or ""
    if "[TOOL_CALLS]" in template:
        return MistralParser()
    if "<|python_tag|>" in template or "ipython" in template:
        return Llama3JsonParser()
    return HermesParser()  # Qwen, Hermes, SmolLM3, and ember's own tool prompt (tools.py)
