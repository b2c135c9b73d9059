"""POST /v1/chat/completions: messages through the model's chat template, whole or streamed.

Content may be a string or OpenAI's content parts (text parts only, joined by newlines as vLLM
does for string templates). `tools` and `tool_choice` are tools.py's (the template, the constraint
of required / named choices, the parsed tool_calls); response_format and vLLM's structured-outputs
fields are structured.py's. `max_completion_tokens` (or the older `max_tokens`) defaults to the
rest of the context. With a RAG index the last user message is grounded in it first (grounding.py).
`logprobs: true` with `top_logprobs: k` gives OpenAI's chat shape. A stream starts each choice
with a `{"role": "assistant"}` delta and ends it with its finish_reason; with
`stream_options.include_usage` a last chunk carries the usage and no choices.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ember.errors import EmberError
from ember.serve.errors import bad_request
from ember.serve.logprobs import chat_logprobs, prompt_logprobs_json
from ember.serve.protocol import ChatCompletionRequest, ChatMessage
from ember.serve.serving import Accumulated, Requests, Serving
from ember.serve.streaming import SSEResponse, merge
from ember.serve.structured import structured_outputs_of
from ember.serve.tools import ToolPlan, ToolReply, plan_tools, template_messages

# apply_chat_template's own arguments may not come in through chat_template_kwargs
_RESERVED = {"messages", "conversation", "tools", "add_generation_prompt", "tokenize"}


def message_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the template sees them: None fields dropped, text parts joined."""
    out = []
    for i, m in enumerate(messages):
        d = m.model_dump(exclude_none=True)
        if isinstance(m.content, list):
            for part in m.content:
                if part.type != "text" or part.text is None:
                    raise bad_request(f"only text content parts are supported, got type {part.type[:40]!r}",
                                      f"messages.{i}.content")
            d["content"] = "\n".join(part.text for part in m.content)
        out.append(d)
    return out


async def render_prompt(serving: Serving, msgs: list[dict[str, Any]], add_generation_prompt: bool,
                  continue_final_message: bool, add_special_tokens: bool, tools: list | None,
                  template_kwargs: dict[str, Any] | None) -> list[int]:
    """Prompt token ids of a conversation (shared by chat completions and /tokenize)."""
    if add_generation_prompt and continue_final_message:
        raise bad_request("continue_final_message needs add_generation_prompt=false", "continue_final_message")
    clash = _RESERVED & set(template_kwargs or {})
    if clash:
        raise bad_request(f"chat_template_kwargs may not set {', '.join(sorted(clash))}", "chat_template_kwargs")
    tok = serving.tokenizer
    try:
        text = tok.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, tools=tools,
                                       **(template_kwargs or {}))
    except EmberError as e:
        raise bad_request(str(e), "messages") from None
    if continue_final_message:  # end the prompt inside the last message (transformers' rule)
        last = msgs[-1].get("content") or ""
        at = text.rfind(last) if last else -1
        if at < 0:
            raise bad_request("continue_final_message: the template does not show the last message's content",
                              "messages")
        text = text[:at + len(last)]
    return await serving.encode(text, add_special_tokens)


async def create_chat_completion(serving: Serving, request: Request) -> Response:
    req = serving.parse(ChatCompletionRequest, await request.body())
    template = serving.tokenizer.chat_template
    plan = plan_tools(req, serving.tool_call_parser, template)
    structured = structured_outputs_of(req)
    if plan.constraint is not None:
        if structured is not None:
            raise bad_request("tool_choice 'required' or a named function already constrains the reply: drop "
                              "response_format / structured_outputs / guided_*", "tool_choice")
        structured = plan.constraint
    if req.top_logprobs and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
    msgs, sources = message_dicts(req.messages), None
    asked = req.max_completion_tokens or req.max_tokens
    use_rag = req.rag if req.rag is not None else serving.grounding is not None
    if use_rag:
        if serving.grounding is None:
            raise bad_request("rag: this server has no RAG index (start it with --rag-index DIR)", "rag")
        asked = asked or serving.grounding.max_tokens
        msgs, sources = await serving.grounding.ground(msgs, serving.tokenizer, serving.max_model_len, asked)
    msgs = template_messages(msgs, plan, template)
    ids = await render_prompt(serving, msgs, req.add_generation_prompt, req.continue_final_message,
                              req.add_special_tokens, plan.tools, req.chat_template_kwargs)
    max_tokens = serving.check_length(len(ids), asked, "messages")
    try:
        params = req.sampling_params(max_tokens, (req.top_logprobs or 0) if req.logprobs else None,
                                     structured_outputs=structured)
    except EmberError as e:
        raise bad_request(str(e)) from None
    if plan.mode == "auto" and not plan.parser.skip_special_tokens:
        params.skip_special_tokens = False  # the parser's marker is a special token (Mistral's [TOOL_CALLS])
    view = _Chat(serving, req, ids, f"chatcmpl-{uuid.uuid4().hex}", sources, plan)
    reqs = serving.start(view.id, [ids], [params], req.model)
    if req.stream:
        return SSEResponse(view.chunks(reqs), on_close=reqs.abort)
    return JSONResponse(view.body((await serving.collect(request, reqs))[0]))


class _Chat:
    """Builds one request's response body or stream chunks in OpenAI's chat shape."""

    def __init__(self, serving: Serving, req: ChatCompletionRequest, ids: list[int], response_id: str,
                 sources: list[dict[str, Any]] | None, plan: ToolPlan) -> None:
        self.serving, self.req, self.ids, self.id, self.sources = serving, req, ids, response_id, sources
        self.plan = plan
        self.created = int(time.time())
        decode = serving.tokenizer.decode
        self.decode_one = lambda t: decode([t])  # noqa: E731

    def _logprobs(self, token_ids: list[int], positions: list | None) -> dict[str, Any] | None:
        if not self.req.logprobs:
            return None
        return {"content": chat_logprobs(token_ids, positions or [], self.req.top_logprobs or 0, self.decode_one)}

    def _usage(self, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": len(self.ids), "completion_tokens": completion_tokens,
                "total_tokens": len(self.ids) + completion_tokens}

    def body(self, acc: Accumulated) -> dict[str, Any]:
        choices = []
        for j in sorted(acc.seqs):
            seq = acc.seqs[j]
            reply = ToolReply(self.plan)
            choices.append({"index": j, "message": reply.message("".join(seq.text)),
                            "logprobs": self._logprobs(seq.token_ids, seq.logprobs),
                            "finish_reason": reply.finish_reason(seq.finish_reason), "stop_reason": seq.stop_reason})
        body = {"id": self.id, "object": "chat.completion", "created": self.created,
                "model": self.serving.response_name(self.req.model), "choices": choices, "usage": self._usage(acc.num_generated)}
        if self.req.prompt_logprobs is not None and acc.prompt_logprobs is not None:
            body["prompt_logprobs"] = prompt_logprobs_json(acc.prompt_logprobs)
        if self.sources is not None:
            body["sources"] = self.sources
        return body

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.serving.response_name(self.req.model), "choices": [choice]}

    async def chunks(self, reqs: Requests) -> AsyncIterator[dict[str, Any]]:
        started: set[int] = set()
        replies: dict[int, ToolReply] = {}
        generated = 0
        continuous = self.req.stream_options is not None and self.req.stream_options.continuous_usage_stats
        async with aclosing(merge(reqs.streams)) as deltas:
            async for _, delta in deltas:
                for c in delta.outputs:
                    if c.index not in started:
                        started.add(c.index)
                        chunk = self._chunk({"index": c.index, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None})
                        if self.sources is not None and len(started) == 1:
                            chunk["sources"] = self.sources
                        yield chunk
                    generated += len(c.token_ids)
                    lps = self._logprobs(c.token_ids, c.logprobs)
                    reply = replies.setdefault(c.index, ToolReply(self.plan))
                    parts = reply.feed(c.text) + (reply.finish() if c.finish_reason is not None else [])
                    if not parts and c.finish_reason is None and not (lps and lps["content"]):
                        continue  # text held back (a stop string, a partial character, a tool call)
                    parts = parts or [{}]
                    for k, part in enumerate(parts):
                        last = k == len(parts) - 1
                        chunk = self._chunk({"index": c.index, "delta": part, "logprobs": lps if k == 0 else None,
                                             "finish_reason": reply.finish_reason(c.finish_reason) if last else None,
                                             "stop_reason": c.stop_reason if last else None})
                        if continuous and last:
                            chunk["usage"] = self._usage(generated)
                        yield chunk
        if self.req.include_usage:
            yield {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                   "model": self.serving.response_name(self.req.model), "choices": [], "usage": self._usage(generated)}
