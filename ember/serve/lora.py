"""The LoRA adapters a server offers as models (`--lora-modules name=path`), and the routes that
load and unload them at run time (`--allow-runtime-lora-updating`), as vLLM does.

    ember serve --model BASE --lora-modules sql=runs/sql-adapter chat=runs/chat-adapter --max-loras 2
    client.completions.create(model="sql", ...)      # the request runs with that adapter
    GET  /v1/models                                   the base, then each adapter with parent = the base
    POST /v1/load_lora_adapter    {"lora_name": "x", "lora_path": "DIR"}   200, or 400 naming the problem
    POST /v1/unload_lora_adapter  {"lora_name": "x"}                       200, or 404 for an unknown name

Each name gets its own engine id (a name unloaded and loaded again gets a new one, so its prefix
cache blocks and slot are never taken for the old adapter's). An adapter is read and checked
against the model (format, rank, targets) before its name is listed: a bad folder never becomes
a model clients can pick. Requests already running keep the adapter they started with.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from typing import TYPE_CHECKING

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from ember.engine.lora_request import LoRARequest
from ember.errors import EmberError
from ember.serve.errors import APIError, bad_request

if TYPE_CHECKING:
    from ember.engine.async_engine import AsyncLLMEngine
    from ember.serve.serving import Serving


class LoRANameError(EmberError):
    """An adapter name that is empty or already taken (by the base model or another adapter)."""


class LoadLoRARequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    lora_name: str
    lora_path: str


class UnloadLoRARequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    lora_name: str


class ServedAdapters:
    """Adapter name -> LoRARequest, for the names clients send as `model`."""

    def __init__(self, engine: AsyncLLMEngine, base_name: str) -> None:
        self.engine = engine
        self.base_name = base_name
        self.by_name: dict[str, LoRARequest] = {}
        self._ids = itertools.count(1)

    @property
    def enabled(self) -> bool:
        return self.engine.engine.lora is not None

    def get(self, name: str) -> LoRARequest | None:
        return self.by_name.get(name)

    def _new(self, name: str, path: str | os.PathLike) -> LoRARequest:
        if not self.enabled:
            raise EmberError("this server serves no LoRA adapters: start it with --lora-modules or --enable-lora")
        if not name or name == self.base_name or name in self.by_name:
            raise LoRANameError(f"the LoRA name {name!r} is already in use (the base model or another adapter)"
                                if name else "a LoRA adapter needs a name")
        return LoRARequest(name, next(self._ids), os.fspath(path))

    def add_now(self, name: str, path: str | os.PathLike) -> LoRARequest:
        """Register and read an adapter (server start-up, before the engine runs)."""
        lr = self._new(name, path)
        self.engine.engine.lora.check(lr)
        self.engine.engine.lora.read(lr)
        self.by_name[name] = lr
        return lr

    async def add(self, name: str, path: str) -> LoRARequest:
        """Register an adapter while serving: it is read and checked off the event loop first."""
        lr = self._new(name, path)
        manager = self.engine.engine.lora
        manager.check(lr)
        await asyncio.to_thread(manager.read, lr)  # reads only: the engine's state is untouched
        if name in self.by_name:  # raced with another load of the same name
            raise LoRANameError(f"the LoRA name {name!r} is already in use")
        self.by_name[name] = lr
        return lr

    def remove(self, name: str) -> LoRARequest:
        lr = self.by_name.pop(name, None)
        if lr is None:
            raise APIError(404, f"The lora adapter '{name[:200]}' cannot be found.", "model_not_found", "lora_name")
        return lr


def add_lora_routes(app: FastAPI, serving: Serving) -> None:
    """POST /v1/load_lora_adapter and /v1/unload_lora_adapter (only with --allow-runtime-lora-updating)."""
    from ember.serve.openapi import request_body  # openapi.py imports this module's request models
    adapters = serving.adapters

    text = {200: {"description": "done", "content": {"text/plain": {"schema": {"type": "string"}}}}}

    @app.post("/v1/load_lora_adapter", response_class=PlainTextResponse, responses=text,
              openapi_extra=request_body(LoadLoRARequest))
    async def load_lora_adapter(request: Request) -> Response:
        req = serving.parse(LoadLoRARequest, await request.body())
        try:
            await adapters.add(req.lora_name, req.lora_path)
        except LoRANameError as e:
            raise bad_request(str(e), "lora_name") from None
        except EmberError as e:
            raise bad_request(str(e), "lora_path") from None
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", response_class=PlainTextResponse, responses=text,
              openapi_extra=request_body(UnloadLoRARequest))
    async def unload_lora_adapter(request: Request) -> Response:
        req = serving.parse(UnloadLoRARequest, await request.body())
        adapters.remove(req.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")
