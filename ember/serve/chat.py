"""POST /v1/chat/completions: messages through the model's chat template, whole or streamed.

Content may be a string or OpenAI's content parts (text parts only, joined by newlines as vLLM
does for string templates). `tools` are passed to the template; tool calls in the reply are not
parsed, so `tool_choice` must be "auto" or "none", and `response_format` must be text.
`max_completion_tokens` (or the older `max_tokens`) defaults to the rest of the context. With a
RAG index the last user message is grounded in it first (grounding.py).
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

from ember.engine.sampling_params import SamplingParamsError
from ember.errors import EmberError
from ember.serve.errors import bad_request
from ember.serve.logprobs import chat_logprobs, prompt_logprobs_json
from ember.serve.protocol import ChatCompletionRequest, ChatMessage
from ember.serve.serving import Accumulated, Requests, Serving
from ember.serve.streaming import SSEResponse, merge

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
    if req.response_format is not None and req.response_format.type != "text":
        raise bad_request("response_format json_object / json_schema is not supported (no guided decoding)",
                          "response_format")
    if isinstance(req.tool_choice, dict) or req.tool_choice not in (None, "auto", "none"):
        raise bad_request("tool_choice must be 'auto' or 'none': ember does not parse tool calls", "tool_choice")
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
    ids = await render_prompt(serving, msgs, req.add_generation_prompt, req.continue_final_message,
                              req.add_special_tokens, req.tools, req.chat_template_kwargs)
    max_tokens = serving.check_length(len(ids), asked, "messages")
    try:
        params = req.sampling_params(max_tokens, (req.top_logprobs or 0) if req.logprobs else None)
    except SamplingParamsError as e:
        raise bad_request(str(e)) from None
    view = _Chat(serving, req, ids, f"chatcmpl-{uuid.uuid4().hex}", sources)
    reqs = serving.start(view.id, [ids], [params])
    if req.stream:
        return SSEResponse(view.chunks(reqs), on_close=reqs.abort)
    return JSONResponse(view.body((await serving.collect(request, reqs))[0]))


class _Chat:
    """Builds one request's response body or stream chunks in OpenAI's chat shape."""

    def __init__(self, serving: Serving, req: ChatCompletionRequest, ids: list[int], response_id: str,
                 sources: list[dict[str, Any]] | None) -> None:
        self.serving, self.req, self.ids, self.id, self.sources = serving, req, ids, response_id, sources
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
            choices.append({"index": j, "message": {"role": "assistant", "content": "".join(seq.text)},
                            "logprobs": self._logprobs(seq.token_ids, seq.logprobs),
                            "finish_reason": seq.finish_reason, "stop_reason": seq.stop_reason})
        body = {"id": self.id, "object": "chat.completion", "created": self.created,
                "model": self.serving.model_name, "choices": choices, "usage": self._usage(acc.num_generated)}
        if self.req.prompt_logprobs is not None and acc.prompt_logprobs is not None:
            body["prompt_logprobs"] = prompt_logprobs_json(acc.prompt_logprobs)
        if self.sources is not None:
            body["sources"] = self.sources
        return body

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.serving.model_name, "choices": [choice]}

    async def chunks(self, reqs: Requests) -> AsyncIterator[dict[str, Any]]:
        started: set[int] = set()
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
                    if not c.text and c.finish_reason is None and not (lps and lps["content"]):
                        continue  # text held back (a possible stop string, a partial character)
                    chunk = self._chunk({"index": c.index, "delta": {"content": c.text} if c.text else {},
                                         "logprobs": lps, "finish_reason": c.finish_reason,
                                         "stop_reason": c.stop_reason})
                    if continuous:
                        chunk["usage"] = self._usage(generated)
                    yield chunk
        if self.req.include_usage:
            yield {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                   "model": self.serving.model_name, "choices": [], "usage": self._usage(generated)}
