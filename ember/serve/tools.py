"""Chat tools: what `tools` + `tool_choice` do to the prompt, the decoding and the reply.

    plan = plan_tools(req, parser_name, tokenizer.chat_template)     # 400 for a choice that cannot be
    msgs = template_messages(msgs, plan, tokenizer.chat_template)    # the conversation the template sees
    reply = ToolReply(plan)                                          # one per choice
    reply.feed(text_delta) -> [delta, ...]; reply.finish() -> [delta, ...]   # streamed: content / tool_calls
    reply.message(whole_text) -> {"role": "assistant", "content": ..., "tool_calls": [...]}

tool_choice (OpenAI's; default "auto" with tools, else "none"):
    none       tools are not shown to the model and nothing is parsed
    auto       tools go into the template (`tools`, as transformers passes them); the reply is parsed
               by the model family's parser (tool_parsers.py) into tool_calls, the rest is content
    required   the reply is constrained (grammar) to a JSON list of {"name", "parameters"} whose
               parameters follow that function's schema: it always parses into >= 1 call
    {"type": "function", "function": {"name": F}}   the reply is constrained to F's parameters
               schema, and becomes one call of F
Templates written without tools (SmolLM2's ChatML, ember's default) get the tools as a system
message in the Hermes format, and earlier assistant tool calls as Hermes `<tool_call>` text, so
the model can see both; `tool` role messages go in as they are. Streams send content as it comes,
hold text that may open a call, and send each call whole (id, name, arguments) once it is
known; a named choice streams its arguments as they are generated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ember.engine.structured_outputs import StructuredOutputsParams
from ember.serve.errors import bad_request
from ember.serve.protocol import ChatCompletionRequest
from ember.serve.tool_parsers import ParsedCall, ToolParser, tool_parser

_NO_ARGS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass
class ToolPlan:
    mode: str  # none | auto | required | named
    parser: ToolParser
    tools: list[dict[str, Any]] | None = None  # OpenAI tool dicts, for the template
    function: str | None = None  # the named function
    constraint: StructuredOutputsParams | None = None
    schemas: dict[str, dict[str, Any]] = field(default_factory=dict)
    parallel: bool = True  # parallel_tool_calls: False keeps the first parsed call only


def plan_tools(req: ChatCompletionRequest, parser_name: str | None, chat_template: str | None) -> ToolPlan:
    """What this request's tools and tool_choice mean; a 400 for a choice that cannot be honoured."""
    parser = tool_parser(parser_name, chat_template)
    choice = req.tool_choice if req.tool_choice is not None else ("auto" if req.tools else "none")
    if choice == "none":
        return ToolPlan("none", parser)
    if not req.tools:
        raise bad_request("tool_choice other than 'none' needs tools", "tool_choice")
    tools = [t.model_dump(exclude_none=True) for t in req.tools]
    schemas = {t.function.name: t.function.parameters or _NO_ARGS for t in req.tools}
    if len(schemas) != len(req.tools):
        raise bad_request("tools: function names must be unique", "tools")
    plan = ToolPlan("auto", parser, tools, schemas=schemas, parallel=req.parallel_tool_calls is not False)
    if choice == "auto":
        return plan
    if choice == "required":
        calls = [{"type": "object", "properties": {"name": {"const": name}, "parameters": schema},
                  "required": ["name", "parameters"], "additionalProperties": False}
                 for name, schema in schemas.items()]
        array: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if req.parallel_tool_calls is False:
            array["maxItems"] = 1
        plan.mode, plan.constraint = "required", StructuredOutputsParams(json=array)
        return plan
    name = choice.function.name
    if name not in schemas:
        raise bad_request(f"tool_choice names function {name[:64]!r}, which is not in tools", "tool_choice")
    plan.mode, plan.function = "named", name
    plan.constraint = StructuredOutputsParams(json=schemas[name])
    return plan


def template_messages(msgs: list[dict[str, Any]], plan: ToolPlan, chat_template: str | None) -> list[dict[str, Any]]:
    """The conversation as the template should see it (see the module docstring)."""
    template = chat_template or ""
    knows_calls = "tool_calls" in template
    out = []
    for m in msgs:
        m = dict(m)
        if m.get("content") is None:
            m["content"] = ""  # templates concatenate content; None would not render
        calls = m.get("tool_calls")
        if calls:
            for c in calls:  # templates expect the arguments as a mapping (transformers, vLLM)
                try:
                    c["function"]["arguments"] = json.loads(c["function"]["arguments"])
                except ValueError:
                    pass  # opaque text, as OpenAI keeps it: the template gets the string
            if not knows_calls:
                m["content"] += "".join(_hermes_call(c["function"]) for c in calls)
                del m["tool_calls"]
        out.append(m)
    if plan.tools and "tools" not in template:
        prompt = _tool_prompt(plan.tools)
        if out and out[0]["role"] == "system":
            out[0]["content"] = f"{out[0]['content']}\n\n{prompt}" if out[0]["content"] else prompt
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def _hermes_call(function: dict[str, Any]) -> str:
    body = {"name": function["name"], "arguments": function["arguments"]}
    return "<tool_call>\n" + json.dumps(body, ensure_ascii=False) + "\n</tool_call>"


def _tool_prompt(tools: list[dict[str, Any]]) -> str:
    # Hermes' wording, shortened: small models have small contexts
    listed = "\n".join(json.dumps(t["function"], ensure_ascii=False, separators=(",", ":")) for t in tools)
    return ("You may call functions. Their JSON schemas:\n<tools>\n" + listed + "\n</tools>\n"
            'To call one, reply <tool_call>{"name": <name>, "arguments": <args object>}</tool_call>')


class ToolReply:
    """One choice's reply under a ToolPlan: streamed deltas or a whole message."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.text = ""
        self.sent = 0  # characters of text already sent as content
        self.ids: list[str] = []
        self.called = False

    # ---- whole replies -------------------------------------------------------------------------
    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        mode = self.plan.mode
        if mode == "named":
            return None, [ParsedCall(self.plan.function, text)]
        if mode == "required":
            try:
                items = json.loads(text)
            except ValueError:  # cut by max_tokens: what was generated is returned as content
                return text, []
            return None, [ParsedCall(i["name"], json.dumps(i["parameters"], ensure_ascii=False)) for i in items]
        if mode == "auto":
            content, calls = self.plan.parser.parse(text)
            return content, calls if self.plan.parallel else calls[:1]
        return text, []

    def _tool_calls(self, calls: list[ParsedCall]) -> list[dict[str, Any]]:
        while len(self.ids) < len(calls):
            self.ids.append(self.plan.parser.call_id())
        self.called = self.called or bool(calls)
        return [{"id": self.ids[i], "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for i, c in enumerate(calls)]

    def message(self, text: str) -> dict[str, Any]:
        content, calls = self.parse(text)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = self._tool_calls(calls)
        return message

    def finish_reason(self, reason: str | None) -> str | None:
        """OpenAI says "tool_calls" when the model chose to call (auto, required), "stop" when told to."""
        if reason == "stop" and self.called and self.plan.mode in ("auto", "required"):
            return "tool_calls"
        return reason

    # ---- streams -------------------------------------------------------------------------------
    def feed(self, delta: str) -> list[dict[str, Any]]:
        """Deltas to send for this much more text."""
        self.text += delta
        mode = self.plan.mode
        if mode == "none":
            return [{"content": delta}] if delta else []
        if mode == "named":
            out = []
            if not self.ids:
                call = self._tool_calls([ParsedCall(self.plan.function, "")])[0]
                out.append({"tool_calls": [{"index": 0, **call}]})
            if delta:
                out.append({"tool_calls": [{"index": 0, "function": {"arguments": delta}}]})
            return out
        if mode == "auto":
            end = self.plan.parser.content_end(self.text)
            if end > self.sent:
                piece, self.sent = self.text[self.sent:end], end
                return [{"content": piece}]
        return []  # required: nothing is content; the calls go out whole at the end

    def finish(self) -> list[dict[str, Any]]:
        """The last deltas, once the reply is complete."""
        if self.plan.mode in ("none", "named"):
            return []
        content, calls = self.parse(self.text)
        out = []
        if not calls:
            rest = self.text[self.sent:]
            return [{"content": rest}] if rest else []
        if self.plan.mode == "auto":
            end = self.plan.parser.content_end(self.text)
            if end > self.sent:
                out.append({"content": self.text[self.sent:end]})
        for i, call in enumerate(self._tool_calls(calls)):
            out.append({"tool_calls": [{"index": i, **call}]})
        return out
