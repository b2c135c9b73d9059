"""What every endpoint shares: the engine, the served model's name and limits, admission control.

    serving = Serving(engine, "my-model", max_queue_len=256, metrics=metrics)
    req = serving.parse(CompletionRequest, await request.body())          # 400 naming the field
    max_tokens = serving.check_length(len(ids), req.max_tokens)             # 400 saying the lengths
    reqs = serving.start("cmpl-1", [ids], [params])                         # 429 when the queue is full
    results = await serving.collect(request, reqs)                          # list[Accumulated]
    return SSEResponse(chunks(reqs.streams), on_close=reqs.abort)           # or stream the deltas

Admission: the engine runs at most max_num_seqs sequences; requests beyond that wait in its
queue. The server admits a request only while fewer than max_num_seqs + max_queue_len are
unfinished (AsyncLLMEngine.num_unfinished, so nothing can leak); the rest get 429 with
Retry-After and are never queued, so an overloaded server keeps its latency bounded and
recovers as soon as load drops.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from ember.engine.async_engine import AsyncLLMEngine
from ember.engine.lora_request import LoRARequest
from ember.engine.request import PositionLogprobs, RequestMetrics, RequestOutput
from ember.engine.sampling_params import SamplingParams
from ember.errors import EmberError
from ember.serve.errors import APIError, bad_request, validation_error
from ember.serve.grounding import Grounding
from ember.serve.lora import ServedAdapters
from ember.serve.metrics import ServerMetrics
from ember.serve.streaming import unless_disconnected
from ember.tokenizer import Tokenizer

log = logging.getLogger("ember.serve")
M = TypeVar("M", bound=BaseModel)
_THREAD_ENCODE_CHARS = 8192  # longer texts are tokenized off the event loop


class GeneratedSequence:
    """One generated sequence, accumulated from its deltas."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[PositionLogprobs] | None = None
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None


class Accumulated:
    """A whole request's output built from its stream of deltas (n sequences, prompt logprobs)."""

    def __init__(self) -> None:
        self.seqs: dict[int, GeneratedSequence] = {}
        self.prompt_logprobs: list[PositionLogprobs | None] | None = None
        self.metrics: RequestMetrics | None = None

    def add(self, delta: RequestOutput) -> None:
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        self.metrics = delta.metrics
        for c in delta.outputs:
            seq = self.seqs.setdefault(c.index, GeneratedSequence())
            seq.text.append(c.text)
            seq.token_ids.extend(c.token_ids)
            if c.logprobs is not None:
                if seq.logprobs is None:
                    seq.logprobs = []
                seq.logprobs.extend(c.logprobs)
            if c.finish_reason is not None:
                seq.finish_reason, seq.stop_reason = c.finish_reason, c.stop_reason

    @property
    def num_generated(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs.values())


class Serving:
    """Shared state and checks of the OpenAI endpoints; see the module docstring."""

    def __init__(self, engine: AsyncLLMEngine, model_name: str, max_queue_len: int,
                 metrics: ServerMetrics, grounding: Grounding | None = None,
                 tool_call_parser: str | None = None) -> None:
        self.engine = engine
        self.tool_call_parser = tool_call_parser  # None: chosen from the chat template (tool_parsers.py)
        self.grounding = grounding
        self.model_name = model_name
        self.max_queue_len = max_queue_len
        self.metrics = metrics
        self.created = int(time.time())
        self.adapters = ServedAdapters(engine, model_name)  # LoRA adapters served under their own names

    @property
    def tokenizer(self) -> Tokenizer:
        tok = self.engine.engine.tokenizer
        if tok is None:
            raise bad_request("this server has no tokenizer: send prompts as token ids")
        return tok

    @property
    def max_model_len(self) -> int:
        return self.engine.engine.max_model_len

    @property
    def capacity(self) -> int:
        return self.engine.engine.config.max_num_seqs + self.max_queue_len

    # ---- requests ------------------------------------------------------------------------------
    def parse(self, model: type[M], body: bytes) -> M:
        try:
            req = model.model_validate_json(body)
        except ValidationError as e:
            raise validation_error(e) from None
        if req.model_extra:
            log.warning("ignoring unknown request field(s): %s", ", ".join(sorted(req.model_extra))[:200])
        name = getattr(req, "model", None)
        if name is not None:
            self.lora_for(name)
        return req

    def lora_for(self, name: str | None) -> LoRARequest | None:
        """The adapter a request's `model` names (None: the base model); 404 for an unknown name."""
        if name is None or name == self.model_name:
            return None
        lr = self.adapters.get(name)
        if lr is None:
            served = ", ".join(f"`{n}`" for n in [self.model_name, *self.adapters.by_name][:20])
            raise APIError(404, f"The model `{name[:200]}` does not exist: this server serves {served}.",
                           "model_not_found", "model")
        return lr

    def response_name(self, name: str | None) -> str:
        """The `model` a response reports: the adapter the request named, else the base model."""
        return name if name is not None and self.adapters.get(name) is not None else self.model_name

    async def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        if len(text) > _THREAD_ENCODE_CHARS:
            return await asyncio.to_thread(self.tokenizer.encode, text, add_special_tokens)
        return self.tokenizer.encode(text, add_special_tokens)

    def check_length(self, num_prompt: int, max_tokens: int | None, what: str = "prompt") -> int:
        """The request's max_tokens (unset: the rest of the context); 400 when it cannot fit."""
        limit = self.max_model_len
        if num_prompt == 0:
            raise bad_request(f"the {what} is empty: give at least one token", param=what)
        if num_prompt >= limit:
            raise bad_request(f"This model's maximum context length is {limit} tokens. However, your {what} "
                              f"has {num_prompt} tokens: shorten it.", param=what, code="context_length_exceeded")
        if max_tokens is None:
            return limit - num_prompt
        if num_prompt + max_tokens > limit:
            raise bad_request(f"This model's maximum context length is {limit} tokens. However, you requested "
                              f"{num_prompt + max_tokens} tokens ({num_prompt} in the {what}, {max_tokens} in "
                              "the completion). Reduce the length of the prompt or max_tokens.",
                              param="max_tokens", code="context_length_exceeded")
        return max_tokens

    def admit(self, count: int) -> None:
        if self.engine.errored is not None:
            raise APIError(503, f"the engine stopped after an error: {self.engine.errored}", "engine_error")
        if self.engine.num_unfinished + count > self.capacity:
            raise APIError(429, f"the server is at capacity ({self.engine.engine.config.max_num_seqs} running + "
                                f"{self.max_queue_len} queued requests): retry later", "queue_full",
                           headers={"Retry-After": "1"})

    def start(self, request_id: str, prompts: list[list[int]], params: list[SamplingParams],
              model: str | None = None) -> "Requests":
        """Queue one engine request per prompt (all or none), with the adapter `model` names; 429
        when the queue is full."""
        lora = self.lora_for(model)
        self.admit(len(prompts))
        reqs = Requests(self.engine)
        try:
            for i, (ids, p) in enumerate(zip(prompts, params)):
                rid = request_id if len(prompts) == 1 else f"{request_id}-{i}"
                stream = self.engine.add_request(rid, ids, p, lora_request=lora)
                reqs.ids.append(rid)
                reqs.streams.append(self.metrics.track(stream))
        except EmberError as e:
            reqs.abort()
            raise bad_request(str(e)) from None
        return reqs

    async def collect(self, request: Request, reqs: "Requests") -> list[Accumulated]:
        """Whole outputs of non-streaming requests; aborted if the client disconnects first."""
        async def drain(stream: AsyncIterator[RequestOutput]) -> Accumulated:
            acc = Accumulated()
            async with aclosing(stream):
                async for delta in stream:
                    acc.add(delta)
            return acc

        try:
            return await unless_disconnected(request, asyncio.gather(*map(drain, reqs.streams)))
        finally:
            reqs.abort()  # a no-op for requests that finished


class Requests:
    """The engine requests of one API call: their delta streams, and a sure way to abort them.

    Closing a stream aborts its request only if the stream was started; `abort` works in every
    case (a response cancelled before its first chunk), and is a no-op once they finished.
    """

    def __init__(self, engine: AsyncLLMEngine) -> None:
        self.engine = engine
        self.ids: list[str] = []
        self.streams: list[AsyncIterator[RequestOutput]] = []

    def abort(self) -> None:
        for rid in self.ids:
            self.engine.abort(rid)

