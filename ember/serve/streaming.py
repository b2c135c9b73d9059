"""Server-sent events in OpenAI's format, and what ties a request's life to its client.

    return SSEResponse(chunks, on_close=requests.abort)   # `data: {json}` events, then `data: [DONE]`
    async for i, delta in merge(streams): ...          # several prompts' deltas as they come
    result = await unless_disconnected(request, coro)  # ClientDisconnected if the client leaves first

A client that goes away must not leave its requests running: Starlette cancels a streaming
response when the client disconnects (and a failed write ends it too), and SSEResponse then
aborts the request ids (freeing their KV blocks) and closes the chunk generator chain.
Non-streaming requests race the generation against the ASGI `http.disconnect` message
(unless_disconnected), as vLLM's `with_cancellation` does.
A failure after the response has started is sent as one `data: {"error": ...}` event.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Send

from ember.engine.request import RequestOutput
from ember.serve.errors import error_body

log = logging.getLogger("ember.serve")
T = TypeVar("T")
DONE = b"data: [DONE]\n\n"


class ClientDisconnected(Exception):
    """The client closed the connection before its response was ready."""


def event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def sse_events(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    """OpenAI's stream framing: one event per chunk, an error event on failure, then [DONE]."""
    async with aclosing(chunks):
        try:
            async for chunk in chunks:
                yield event(chunk)
        except Exception as e:  # the status line (200) is already sent: report in-band
            log.error("stream failed: %r", e)
            yield event(error_body(500, f"generation failed: {e}", "engine_error"))
    yield DONE


class SSEResponse(StreamingResponse):
    """A text/event-stream response that always closes its generator (aborting the requests)."""

    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncIterator[dict[str, Any]], on_close: Callable[[], None]) -> None:
        super().__init__(sse_events(chunks), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            self.on_close()  # abort what is still running, even if the stream never started
            await self.body_iterator.aclose()  # nothing in the cleanup awaits: safe while cancelled


async def merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(stream index, delta) from several streams as they arrive; closing this closes them all."""
    if len(streams) == 1:
        async with aclosing(streams[0]) as only:
            async for delta in only:
                yield 0, delta
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async with aclosing(stream):
                async for delta in stream:
                    queue.put_nowait((i, delta))
        except Exception as e:
            queue.put_nowait((i, e))
        finally:
            queue.put_nowait((i, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()  # each pump's aclosing aborts its request


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it and raising ClientDisconnected if the client hangs up first."""
    task = asyncio.ensure_future(work)

    async def hangup() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(hangup())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()
