"""A small OpenAI-compatible server over a transformers model, for testing the HTTP backend.

It implements what the eval backend uses, computed independently of ember (transformers'
model and tokenizer, full-sequence forwards, greedy decoding):

    GET  /v1/models             {"data": [{"id": "fake-model", "max_model_len": N}]}
    POST /v1/completions        prompt: str | [int] | [str] | [[int]]; echo + logprobs -> token_logprobs,
                                top_logprobs (token_logprobs[0] is null, as OpenAI's); stop strings
    POST /v1/chat/completions   chat template -> greedy reply; or a scripted reply (a fake judge)

    with serve(make_app(model_dir)) as url: ...      # uvicorn on 127.0.0.1, a free port, in a thread

`fail_first=n` answers the first n requests with HTTP 503 (to test retries); `echo=False`
ignores echo (a server without prompt log-probabilities).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ember.serve.server import running as serve  # noqa: F401  (uvicorn on a free localhost port, in a thread)

Reply = Callable[[list[dict[str, str]]], str]


def _cut(text: str, stop: Any) -> str:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    cut = min((i for s in stops if s and (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


def make_app(model_dir: Path | None = None, reply: Reply | None = None, fail_first: int = 0,
             echo: bool = True) -> FastAPI:
    """The fake server: a transformers model from model_dir, and/or a scripted chat reply."""
    import transformers

    model = tok = None
    if model_dir is not None:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    limit = model.config.max_position_embeddings if model is not None else 4096
    app = FastAPI()
    state = {"requests": 0}
    app.state.calls = state

    @app.middleware("http")
    async def flaky(request: Request, call_next):
        state["requests"] += 1
        if state["requests"] <= fail_first:
            return JSONResponse({"error": {"message": "overloaded"}}, status_code=503)
        return await call_next(request)

    @torch.no_grad()
    def greedy(ids: list[int], max_tokens: int) -> list[int]:
        eos_cfg = model.config.eos_token_id
        eos = set(eos_cfg if isinstance(eos_cfg, list) else [eos_cfg])
        out: list[int] = []
        for _ in range(min(max_tokens, limit - len(ids))):
            nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            if nxt in eos:
                break
            out.append(nxt)
        return out

    @torch.no_grad()
    def echo_logprobs(ids: list[int], k: int) -> dict[str, Any]:
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
        tokens = tok.convert_ids_to_tokens(ids)
        token_lps: list[float | None] = [None]
        tops: list[dict[str, float] | None] = [None]
        for i in range(1, len(ids)):
            row = logp[i - 1]
            token_lps.append(float(row[ids[i]]))
            vals, idx = row.topk(k)
            tops.append({tokens_i: float(v) for tokens_i, v in
                         zip(tok.convert_ids_to_tokens(idx.tolist()), vals)})
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
                "text_offset": [0] * len(ids)}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": "fake-model", "object": "model", "max_model_len": limit}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> dict:
        body = await request.json()
        prompt = body["prompt"]
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        choices = []
        for i, p in enumerate(prompt):
            ids = tok.encode(p, add_special_tokens=False) if isinstance(p, str) else list(p)
            new = greedy(ids, int(body.get("max_tokens", 16)))
            text = _cut(tok.decode(new, skip_special_tokens=True), body.get("stop"))
            choice: dict[str, Any] = {"index": i, "finish_reason": "length", "logprobs": None}
            if echo and body.get("echo"):
                text = tok.decode(ids) + text
                if body.get("logprobs"):
                    choice["logprobs"] = echo_logprobs(ids + new, int(body["logprobs"]))
            choice["text"] = text
            choices.append(choice)
        return {"id": "cmpl-fake", "object": "text_completion", "model": "fake-model", "choices": choices}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict:
        body = await request.json()
        messages = body["messages"]
        if reply is not None:
            content = reply(messages)
        else:
            prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            new = greedy(tok.encode(prompt, add_special_tokens=False), int(body.get("max_tokens", 16)))
            content = _cut(tok.decode(new, skip_special_tokens=True), body.get("stop"))
        return {"id": "chat-fake", "object": "chat.completion", "model": "fake-model",
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": content}}]}

    return app
