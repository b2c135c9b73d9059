"""StructuredOutputsParams: the one constraint a request's output must satisfy (vLLM's names).

    SamplingParams(structured_outputs=StructuredOutputsParams(json={"type": "object", ...}))
    StructuredOutputsParams(json_object=True)                 # any JSON object
    StructuredOutputsParams(regex=r"\\d{3}-\\d{4}")
    StructuredOutputsParams(choice=["positive", "negative"])
    StructuredOutputsParams(grammar='start: "a"+')            # Lark (llguidance's dialect), or GBNF

Exactly one kind may be set; anything else is a SamplingParamsError naming the field, so the
server answers 400 before the grammar library is even imported. `grammar()` turns the
constraint into llguidance's grammar text; compiling it against a vocabulary is grammar.py's.
JSON is compact-with-spaces by default (`{"a": 1, "b": [2, 3]}`, no free whitespace): flexible
whitespace lets a weak model emit newlines forever inside a valid object, which never parses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ember.errors import EmberError


class StructuredOutputsError(EmberError, ValueError):
    """A structured-outputs constraint that is malformed before any compiling (a 400)."""


_KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass
class StructuredOutputsParams:
    """One output constraint; see the module docstring."""

    json: str | dict[str, Any] | None = None  # a JSON schema (object or its JSON text)
    json_object: bool | None = None  # any JSON object (OpenAI's response_format json_object)
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # Lark (llguidance) or llama.cpp GBNF (`root ::= ...`)
    whitespace_pattern: str | None = None  # JSON only: regex of the whitespace allowed between tokens
    schema: dict[str, Any] | bool | None = field(init=False, repr=False, default=None)
    _compiled: dict = field(init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        set_ = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(set_) != 1:
            got = ", ".join(set_) if set_ else "none"
            raise StructuredOutputsError(f"structured_outputs: set exactly one of {', '.join(_KINDS)} (got {got})")
        if self.json is not None:
            schema = self.json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except ValueError as e:
                    raise StructuredOutputsError(f"structured_outputs.json: not valid JSON ({e})") from None
            if not isinstance(schema, (dict, bool)):
                raise StructuredOutputsError("structured_outputs.json: a JSON schema must be an object")
            self.schema = schema
        if self.choice is not None:
            if not isinstance(self.choice, list) or not self.choice or \
                    not all(isinstance(c, str) and c for c in self.choice):
                raise StructuredOutputsError("structured_outputs.choice: give a non-empty list of non-empty strings")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise StructuredOutputsError(f"structured_outputs.{name}: give a non-empty string")

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) not in (None, False))

    def grammar_text(self) -> str:
        """llguidance's grammar for this constraint (raises GrammarError via grammar.py when compiled)."""
        from llguidance import LLMatcher

        if self.schema is not None or self.json_object:
            schema = self.schema if self.schema is not None else {"type": "object"}
            options: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
            if self.whitespace_pattern is not None:
                options = {"whitespace_pattern": self.whitespace_pattern}
            try:
                return LLMatcher.grammar_from_json_schema(schema, defaults=options)
            except ValueError as e:
                raise StructuredOutputsError(f"structured_outputs.json: {e}") from None
        if self.regex is not None:
            return LLMatcher.grammar_from_regex(self.regex)
        if self.choice is not None:
            # JSON string literals are valid Lark literals, escapes included
            return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in self.choice))
        assert self.grammar is not None
        text = self.grammar
        if "::=" in text:  # llama.cpp's GBNF, as llama.cpp server and vLLM's guided_grammar take it
            from llguidance.gbnf_to_lark import gbnf_to_lark

            try:
                text = gbnf_to_lark(text)
            except Exception as e:  # the converter raises plain exceptions on syntax errors
                raise StructuredOutputsError(f"structured_outputs.grammar: not valid GBNF ({e})") from None
        return LLMatcher.grammar_from_lark(text)
