"""The FastAPI app: OpenAI-compatible routes over one AsyncLLMEngine.

    app = create_app("runs/base", served_model_name="base", max_num_seqs=32)   # load + build
    app = build_app(serving, api_key="sk-local", max_body_bytes=16 * 2**20)    # around a Serving

    GET  /health                   200, or 503 once the engine has failed
    GET  /version                  {"version": ...}
    GET  /v1/models[/{id}]         the served model, with max_model_len (as vLLM), and its LoRA adapters
    POST /v1/load_lora_adapter     with allow_runtime_lora_updating (lora.py); and unload_lora_adapter
    POST /v1/completions           completions.py
    POST /v1/chat/completions      chat.py
    POST /tokenize, /detokenize    vLLM's: a prompt or messages -> ids (+ strings); ids -> text
    GET  /tokenizer_info           special tokens, vocabulary size, chat template (remote tokenizers)
    GET  /openapi.json, /docs      the API's schema: every body declared (openapi.py)
    GET  /metrics                  Prometheus text (metrics.py)
    GET  /, /ui/*                  the chat page (webui.py; ui=False / --no-ui leaves it out), with
    GET  /v1/rag/source?path=      the text of a file the RAG index was built from (its source links)
With a RAG index, chat answers are grounded in it and return their sources (grounding.py).

Every failure is an OpenAI-style error body (errors.py): bad JSON or fields 400 naming the
field, unknown model 404, missing API key 401 (/v1/* only), oversized body 413, a full queue
429 with Retry-After, an unknown route 404; a bug is a logged 500 with the same shape. The
lifespan starts the periodic metrics log line and shuts the engine down when the server stops.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ember.engine import LLM
from ember.engine.async_engine import AsyncLLMEngine, EngineDeadError
from ember.errors import EmberError
from ember.model.transformer import Transformer
from ember.serve.chat import create_chat_completion, message_dicts, render_prompt
from ember.serve.completions import create_completion
from ember.serve.errors import APIError, bad_request, error_body, error_response
from ember.serve.grounding import Grounding
from ember.serve.lora import add_lora_routes
from ember.serve.metrics import ServerMetrics
from ember.serve.middleware import ApiKeyGuard, BodyLimit
from ember.serve import responses
from ember.serve.openapi import json_response, openapi_schema, request_body
from ember.serve.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from ember.serve.serving import Serving
from ember.serve.streaming import ClientDisconnected
from ember.serve.webui import add_ui
from ember.serve.tool_parsers import tool_parser
from ember.serve.tools import ToolPlan, template_messages
from ember.tokenizer import Tokenizer

log = logging.getLogger("ember.serve")


def create_app(model: str | os.PathLike | Transformer, tokenizer: str | os.PathLike | Tokenizer | None = None, *,
               served_model_name: str | None = None, api_key: str | None = None, max_queue_len: int = 256,
               max_body_bytes: int = 16 * 2 ** 20, log_interval: float = 10.0, dtype: str = "float32",
               device: str | None = None, adapter: str | os.PathLike | None = None, rag_index: str | os.PathLike | None = None, rag_k: int = 5,
               rag_mode: str = "hybrid", rag_max_tokens: int = 256, tool_call_parser: str | None = None,
               ui: bool = True, lora_modules: dict[str, str | os.PathLike] | None = None,
               allow_runtime_lora_updating: bool = False, **engine_config: Any) -> FastAPI:
    """Load a model folder (or a Transformer; a LoRA `adapter` folder on top) into an AsyncLLMEngine
    and build the app around it; with rag_index, chat answers are grounded in that index (grounding.py);
    tool_call_parser names the tool-call format (tool_parsers.py; default: from the chat template).
    lora_modules {name: adapter folder} are served as models of their own, many in one batch
    (lora.py); allow_runtime_lora_updating adds the routes that load and unload adapters."""
    tool_parser(tool_call_parser)  # an unknown name fails before the model loads
    if lora_modules or allow_runtime_lora_updating:
        engine_config["enable_lora"] = True
    engine = AsyncLLMEngine(LLM(model, tokenizer, dtype=dtype, device=device, adapter=adapter, **engine_config).engine)
    if engine.engine.tokenizer is None:
        raise EmberError("the server needs a tokenizer: give a model folder with tokenizer files, or --tokenizer")
    grounding = Grounding(rag_index, rag_k, rag_mode, rag_max_tokens) if rag_index is not None else None
    name = served_model_name or ("ember" if isinstance(model, Transformer) else str(model))
    serving = Serving(engine, name, max_queue_len, ServerMetrics(engine.stats, name), grounding, tool_call_parser)
    for lora_name, path in (lora_modules or {}).items():
        serving.adapters.add_now(lora_name, path)
    return build_app(serving, api_key=api_key, max_body_bytes=max_body_bytes, log_interval=log_interval, ui=ui,
                     lora_routes=allow_runtime_lora_updating)


def build_app(serving: Serving, api_key: str | None = None, max_body_bytes: int = 16 * 2 ** 20,
              log_interval: float = 10.0, ui: bool = True, lora_routes: bool = False) -> FastAPI:
    """The app for one Serving; see the module docstring."""
    from ember import __version__

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        logger = asyncio.create_task(serving.metrics.log_loop(log_interval)) if log_interval > 0 else None
        try:
            yield
        finally:
            if logger is not None:
                logger.cancel()
            await serving.engine.shutdown()
            if serving.grounding is not None:
                serving.grounding.close()

    app = FastAPI(title="ember", version=__version__, lifespan=lifespan, redoc_url=None)
    app.openapi = lambda: openapi_schema(app, serving)  # type: ignore[method-assign]
    app.state.serving = serving
    _add_error_handlers(app, serving)

    @app.get("/health", response_class=Response, responses={
        200: {"description": "the engine is running (empty body)"},
        503: {"description": "the engine stopped", "content": {"application/json": {"schema": {
            "$ref": "#/components/schemas/ErrorResponse"}}}}})
    async def health() -> Response:
        if serving.engine.errored is not None:
            return JSONResponse(error_body(503, f"the engine stopped: {serving.engine.errored}", "engine_error"), 503)
        return Response(status_code=200)

    @app.get("/version", responses=json_response(responses.Version, "the server's version"))
    async def version() -> dict:
        return {"version": __version__}

    def model_card(name: str) -> dict:
        # root is the served name, never the folder it was loaded from: clients need not learn the
        # server's filesystem layout. An adapter's parent is the base model (vLLM's cards).
        parent = None if name == serving.model_name else serving.model_name
        return {"id": name, "object": "model", "created": serving.created, "owned_by": "ember",
                "root": name, "parent": parent, "max_model_len": serving.max_model_len}

    @app.get("/v1/models", responses=json_response(responses.ModelList, "the served model and its LoRA adapters"))
    async def models() -> dict:
        return {"object": "list", "data": [model_card(n) for n in [serving.model_name, *serving.adapters.by_name]]}

    @app.get("/v1/models/{model_id:path}", responses=json_response(responses.ModelCard, "the model's card"))
    async def model(model_id: str) -> dict:
        if model_id != serving.model_name and serving.adapters.get(model_id) is None:
            raise APIError(404, f"The model `{model_id[:200]}` does not exist.", "model_not_found", "model")
        return model_card(model_id)

    @app.post("/v1/completions", openapi_extra=request_body(CompletionRequest),
              responses=json_response(responses.Completion, "the completion, or its chunks when stream=true", True))
    async def completions(request: Request) -> Response:
        return await create_completion(serving, request)

    @app.post("/v1/chat/completions", openapi_extra=request_body(ChatCompletionRequest),
              responses=json_response(responses.ChatCompletion, "the reply, or its chunks when stream=true", True))
    async def chat_completions(request: Request) -> Response:
        return await create_chat_completion(serving, request)

    @app.post("/tokenize", openapi_extra=request_body(TokenizeRequest),
              responses=json_response(responses.TokenizeResponse, "the token ids"))
    async def tokenize(request: Request) -> dict:
        req = serving.parse(TokenizeRequest, await request.body())
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("give exactly one of prompt or messages")
        if req.prompt is not None:
            add_special = True if req.add_special_tokens is None else req.add_special_tokens
            ids = await serving.encode(req.prompt, add_special)
        else:
            template = serving.tokenizer.chat_template
            tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
            plan = ToolPlan("auto" if tools else "none", tool_parser(serving.tool_call_parser, template), tools)
            ids = await render_prompt(serving, template_messages(message_dicts(req.messages), plan, template),
                                      req.add_generation_prompt, req.continue_final_message,
                                      bool(req.add_special_tokens), tools, req.chat_template_kwargs)
        out = {"count": len(ids), "max_model_len": serving.max_model_len, "tokens": ids}
        if req.return_token_strs:
            out["token_strs"] = serving.tokenizer.convert_ids_to_tokens(ids)
        return out

    @app.post("/detokenize", openapi_extra=request_body(DetokenizeRequest),
              responses=json_response(responses.DetokenizeResponse, "the text"))
    async def detokenize(request: Request) -> dict:
        req = serving.parse(DetokenizeRequest, await request.body())
        vocab = serving.engine.engine.model.config.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"token id(s) {bad[:5]} outside the vocabulary of {vocab}", "tokens")
        return {"prompt": serving.tokenizer.decode(req.tokens)}

    @app.get("/tokenizer_info", responses=json_response(responses.TokenizerInfo, "the tokenizer's settings"))
    async def tokenizer_info() -> dict:
        tok = serving.tokenizer
        return {"tokenizer_class": "PreTrainedTokenizerFast", "vocab_size": tok.vocab_size,
                "model_max_length": serving.max_model_len, "bos_token": tok.bos_token, "eos_token": tok.eos_token,
                "pad_token": tok.pad_token, "unk_token": tok.unk_token, "bos_token_id": tok.bos_token_id,
                "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
                "chat_template": tok.chat_template,
                "add_bos_token": bool(tok.bos_token_id is not None and tok.encode("a")[:1] == [tok.bos_token_id])}

    @app.get("/metrics", response_class=Response, responses={
        200: {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def metrics() -> Response:
        return Response(serving.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    if ui:
        add_ui(app, serving)
    if lora_routes:
        add_lora_routes(app, serving)

    app.add_middleware(BodyLimit, max_bytes=max_body_bytes, on_reject=serving.metrics.count_failure)
    if api_key:
        app.add_middleware(ApiKeyGuard, api_key=api_key, on_reject=serving.metrics.count_failure)
    return app


def _add_error_handlers(app: FastAPI, serving: Serving) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> Response:
        serving.metrics.count_failure(e.code)
        return error_response(e)

    @app.exception_handler(ClientDisconnected)
    async def disconnected(request: Request, e: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nobody reads it; the metrics counted the abort

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        message = (f"no route {request.method} {request.url.path[:200]}" if e.status_code in (404, 405)
                   else str(e.detail))
        return JSONResponse(error_body(e.status_code, message, code), e.status_code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> Response:
        serving.metrics.count_failure("invalid_value")
        return JSONResponse(error_body(400, str(e.errors()[:1]), "invalid_value"), 400)

    @app.exception_handler(EngineDeadError)
    async def engine_dead(request: Request, e: EngineDeadError) -> Response:
        serving.metrics.count_failure("engine_error")
        return JSONResponse(error_body(503, f"the engine failed: {e}", "engine_error"), 503)

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        serving.metrics.count_failure("internal_error")
        return JSONResponse(error_body(500, f"internal server error ({type(e).__name__}); see the server log",
                                       "internal_error"), 500)
