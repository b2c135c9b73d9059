"""POST /v1/completions: the legacy completions API, whole or streamed.

A prompt is a string, a list of strings, a token-id list or a list of token-id lists; each
prompt is one engine request with n sequences, and choice `i * n + j` is sequence j of prompt i
(OpenAI's order). `echo` puts the prompt before the generated text and, with `logprobs`, the
prompt's log-probabilities before the generated ones (first entry null). `max_tokens: 0` with
echo scores the prompt and returns no generated token: lm-evaluation-harness's log-likelihood
request (the engine generates one token, which is dropped). `max_tokens: null` means the rest
of the context; a prompt plus max_tokens over the context is a 400 saying the lengths.
Structured outputs (response_format, structured_outputs, guided_*) apply to every prompt (structured.py).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ember.engine.request import PositionLogprobs
from ember.engine.sampling_params import SamplingParams
from ember.errors import EmberError
from ember.serve.errors import bad_request
from ember.serve.logprobs import completion_logprobs, prompt_logprobs_json
from ember.serve.protocol import CompletionRequest
from ember.serve.serving import Accumulated, Requests, Serving
from ember.serve.streaming import SSEResponse, merge
from ember.serve.structured import structured_outputs_of


async def create_completion(serving: Serving, request: Request) -> Response:
    req = serving.parse(CompletionRequest, await request.body())
    if req.suffix:
        raise bad_request("suffix is not supported", "suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("best_of must equal n: ember does not rank extra samples", "best_of")
    if req.max_tokens == 0 and not req.echo:
        raise bad_request("max_tokens=0 needs echo=true (it scores the prompt and generates nothing)",
                          "max_tokens")
    structured = structured_outputs_of(req)
    prompts = req.prompts()
    if not prompts:
        raise bad_request("prompt must not be empty", "prompt")
    ids = [await serving.encode(p, req.add_special_tokens) if isinstance(p, str) else list(p) for p in prompts]
    echo_only = req.max_tokens == 0
    prompt_lps = req.logprobs if req.echo and req.logprobs is not None else None
    params: list[SamplingParams] = []
    for p in ids:
        max_tokens = serving.check_length(len(p), 1 if echo_only else req.max_tokens)
        try:
            params.append(req.sampling_params(max_tokens, req.logprobs, prompt_lps, structured))
        except EmberError as e:
            raise bad_request(str(e)) from None
    view = _Completion(serving, req, prompts, ids, f"cmpl-{uuid.uuid4().hex}")
    reqs = serving.start(view.id, ids, params, req.model)
    if req.stream:
        return SSEResponse(view.chunks(reqs), on_close=reqs.abort)
    return JSONResponse(view.body(await serving.collect(request, reqs)))


class _Completion:
    """Builds one request's response body or stream chunks in OpenAI's completion shape."""

    def __init__(self, serving: Serving, req: CompletionRequest, prompts: list, ids: list[list[int]],
                 response_id: str) -> None:
        self.serving, self.req, self.ids = serving, req, ids
        self.id = response_id
        self.created = int(time.time())
        self.echo_only = req.max_tokens == 0
        decode = serving.tokenizer.decode
        self.decode_one = lambda t: decode([t])  # noqa: E731
        self.prompt_text = [p if isinstance(p, str) else decode(p) for p in prompts] if req.echo else None

    def _logprobs(self, i: int, gen_ids: list[int], gen_lps: list[PositionLogprobs], offset: int,
                  prompt_lps: list | None, with_prompt: bool) -> dict[str, Any] | None:
        if self.req.logprobs is None:
            return None
        ids, positions = list(gen_ids), list(gen_lps[:len(gen_ids)])
        if with_prompt:
            p = self.ids[i]
            lps = list(prompt_lps or [])[:len(p)]
            ids, positions = p + ids, lps + [None] * (len(p) - len(lps)) + positions
        return completion_logprobs(ids, positions, self.decode_one, offset)

    def _usage(self, completion_tokens: int) -> dict[str, int]:
        prompt = sum(map(len, self.ids))
        return {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
                "total_tokens": prompt + completion_tokens}

    def body(self, results: list[Accumulated]) -> dict[str, Any]:
        choices, generated = [], 0
        for i, acc in enumerate(results):
            for j in sorted(acc.seqs):
                seq = acc.seqs[j]
                gen_ids = [] if self.echo_only else seq.token_ids
                text = "" if self.echo_only else "".join(seq.text)
                generated += len(gen_ids)
                choice = {"index": i * self.req.n + j,
                          "text": (self.prompt_text[i] + text) if self.req.echo else text,
                          "logprobs": self._logprobs(i, gen_ids, seq.logprobs or [], 0, acc.prompt_logprobs,
                                                     self.req.echo),
                          "finish_reason": "length" if self.echo_only else seq.finish_reason,
                          "stop_reason": None if self.echo_only else seq.stop_reason}
                if self.req.prompt_logprobs is not None and acc.prompt_logprobs is not None:
                    choice["prompt_logprobs"] = prompt_logprobs_json(acc.prompt_logprobs)
                choices.append(choice)
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.serving.response_name(self.req.model), "choices": choices, "usage": self._usage(generated)}

    async def chunks(self, reqs: Requests) -> AsyncIterator[dict[str, Any]]:
        req, n = self.req, self.req.n
        started: set[int] = set()
        offsets: dict[int, int] = {}
        prompt_lps: dict[int, list] = {}
        generated = 0
        continuous = req.stream_options is not None and req.stream_options.continuous_usage_stats
        async with aclosing(merge(reqs.streams)) as deltas:
            async for i, delta in deltas:
                if delta.prompt_logprobs is not None:
                    prompt_lps[i] = delta.prompt_logprobs
                for c in delta.outputs:
                    index = i * n + c.index
                    first = index not in started
                    started.add(index)
                    gen_ids = [] if self.echo_only else c.token_ids
                    text = "" if self.echo_only else c.text
                    finish = ("length" if c.finish_reason else None) if self.echo_only else c.finish_reason
                    generated += len(gen_ids)
                    echo = req.echo and first
                    if echo:
                        text = self.prompt_text[i] + text
                    lps = self._logprobs(i, gen_ids, c.logprobs or [], offsets.get(index, 0),
                                         prompt_lps.get(i), echo)
                    if lps is not None and lps["tokens"]:
                        offsets[index] = lps["text_offset"][-1] + len(lps["tokens"][-1])
                    if not text and finish is None and not (lps and lps["tokens"]):
                        continue  # text held back (a possible stop string, a partial character)
                    chunk = {"id": self.id, "object": "text_completion", "created": self.created,
                             "model": self.serving.response_name(self.req.model),
                             "choices": [{"index": index, "text": text, "logprobs": lps, "finish_reason": finish,
                                          "stop_reason": None if self.echo_only else c.stop_reason}]}
                    if continuous:
                        chunk["usage"] = self._usage(generated)
                    yield chunk
        if req.include_usage:
            yield {"id": self.id, "object": "text_completion", "created": self.created,
                   "model": self.serving.response_name(self.req.model), "choices": [], "usage": self._usage(generated)}
