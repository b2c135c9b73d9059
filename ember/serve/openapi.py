"""The OpenAPI document (/openapi.json): every route's request and response bodies, as the server
accepts and returns them.

    app.openapi = lambda: openapi_schema(app, serving)     # app.py does this

The routes parse their bodies by hand (serving.parse: one 400 line naming the field, unknown
fields ignored) so FastAPI cannot see them; each route names its request model in
`openapi_extra` (request_body below) and its responses in `responses`, and this module puts the
pydantic models' JSON schemas under components. Bounds that depend on the served model are
filled in here, so the schema says what this server accepts: `model` is the served name (or
omitted), prompt token ids lie in the vocabulary, max_tokens fits the context.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from ember.serve import protocol, responses
from ember.serve.lora import LoadLoRARequest, UnloadLoRARequest

if TYPE_CHECKING:
    from ember.serve.serving import Serving

_REF = "#/components/schemas/{model}"
REQUESTS = [protocol.CompletionRequest, protocol.ChatCompletionRequest, protocol.TokenizeRequest,
            protocol.DetokenizeRequest, LoadLoRARequest, UnloadLoRARequest]
RESPONSES = [responses.Completion, responses.ChatCompletion, responses.ModelList, responses.ModelCard,
             responses.TokenizeResponse, responses.DetokenizeResponse, responses.TokenizerInfo, responses.Version,
             responses.ErrorResponse]


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` of a route whose JSON body is `model`."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": _REF.format(model=model.__name__)}}}}}


def json_response(model: type[BaseModel], description: str, stream: bool = False) -> dict[int | str, Any]:
    """`responses` of a route: its 200 body (or SSE stream) and the OpenAI-style errors."""
    content: dict[str, Any] = {"application/json": {"schema": {"$ref": _REF.format(model=model.__name__)}}}
    if stream:  # one event per chunk (the 200 body's shape, object "...chunk" for chat), then [DONE]
        content["text/event-stream"] = {"schema": {
            "type": "object", "required": ["data"],
            "properties": {"data": {"type": "string", "contentMediaType": "application/json"},
                           "event": {"type": "string"}}}}
    error = {"content": {"application/json": {"schema": {"$ref": _REF.format(model="ErrorResponse")}}}}
    out: dict[int | str, Any] = {200: {"description": description, "content": content}}
    for code, what in ((400, "invalid request"), (404, "unknown model"), (429, "queue full"),
                       (503, "engine stopped")):
        out[code] = {"description": what, **error}
    return out


def openapi_schema(app: FastAPI, serving: Serving) -> dict[str, Any]:
    """The document, built once per app."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes,
                      description="OpenAI-compatible API of `ember serve` (plus vLLM's extra fields).")
    defs: dict[str, Any] = {}
    for models, mode in ((REQUESTS, "validation"), (RESPONSES, "serialization")):
        _, schema = models_json_schema([(m, mode) for m in models], ref_template=_REF)
        defs.update(schema.get("$defs", {}))
    _bound(defs, serving)
    doc.setdefault("components", {}).setdefault("schemas", {}).update(defs)
    app.openapi_schema = doc
    return doc


def _bound(defs: dict[str, Any], serving: Serving) -> None:
    """Server-specific bounds (see the module docstring)."""
    vocab = serving.engine.engine.model.config.vocab_size
    token = {"type": "integer", "minimum": 0, "maximum": vocab - 1}
    name = {"anyOf": [{"type": "string", "enum": [serving.model_name]}, {"type": "null"}]}
    if serving.adapters.enabled:  # adapters can come and go at run time: /v1/models says which are served
        name = {"anyOf": [{"type": "string", "description": "the served model or one of its LoRA adapters "
                           "(GET /v1/models)"}, {"type": "null"}]}
    for model in ("CompletionRequest", "ChatCompletionRequest", "TokenizeRequest", "DetokenizeRequest"):
        props = defs[model]["properties"]
        props["model"] = {**name, "default": None}
    defs["DetokenizeRequest"]["properties"]["tokens"]["items"] = token
    prompt = defs["CompletionRequest"]["properties"]["prompt"]
    for alt in prompt["anyOf"]:
        if alt.get("items", {}).get("type") == "integer":
            alt["items"] = token
            alt["minItems"] = 1
        elif alt.get("items", {}).get("type") == "array":
            alt["items"] = {"type": "array", "items": token, "minItems": 1}
            alt["minItems"] = 1
    for alt in prompt["anyOf"]:
        if alt.get("type") == "string":
            alt["minLength"] = 1
        elif alt.get("items", {}).get("type") == "string":
            alt["minItems"] = 1
            alt["items"] = {"type": "string", "minLength": 1}
    props = defs["CompletionRequest"]["properties"]
    # accepted only in their trivial forms (checked by hand, completions.py): documented as such
    props["suffix"] = {"anyOf": [{"type": "string", "maxLength": 0}, {"type": "null"}], "default": None}
    props["best_of"] = {"type": "null", "default": None, "description": "must equal n when given"}
    props["max_tokens"]["anyOf"][0]["minimum"] = 1  # 0 is also accepted, with echo=true (scoring)
    limit = serving.max_model_len
    for model in ("CompletionRequest", "ChatCompletionRequest"):
        props = defs[model]["properties"]
        for name in ("max_tokens", "max_completion_tokens"):
            if name in props:
                props[name]["anyOf"][0]["maximum"] = limit - 1  # with the prompt, within the context
        props["min_tokens"]["maximum"] = limit - 1
        props["stop_token_ids"] = {"anyOf": [{"type": "array", "items": token}, {"type": "null"}], "default": None}
        props["logit_bias"]["anyOf"][0]["propertyNames"] = {"pattern": "^[0-9]{1,9}$"}
        props["logit_bias"]["anyOf"][0]["additionalProperties"] = {"type": "number", "minimum": -100, "maximum": 100}
        props["guided_json"] = {"anyOf": [{"type": "object"}, {"type": "null"}], "default": None}
    defs["StructuredOutputsField"]["properties"]["json"] = {"anyOf": [{"type": "object"}, {"type": "null"}],
                                                            "default": None}
    # what the default templates render (a custom one may accept more roles); text parts only
    defs["ChatMessage"]["properties"]["role"] = {"type": "string", "enum": ["system", "user", "assistant", "tool"]}
    defs["ContentPart"]["properties"]["type"] = {"type": "string", "enum": ["text"]}
    defs["ContentPart"]["required"] = ["type", "text"]
    defs["ContentPart"]["properties"]["text"] = {"type": "string"}
    defs["FunctionCall"]["properties"]["arguments"]["contentMediaType"] = "application/json"
