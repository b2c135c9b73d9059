"""One HTTP request through an ASGI app in process, its response as a stream of ASGI messages.

    req = RawRequest("POST", "/v1/completions", b"", [(b"content-type", b"application/json")], body)
    async for message in call_asgi(app, req):      # {"type": "http.response.start", ...}, then bodies
        ...

This is how a Ray Serve front hands a request to an engine replica (ember/serve/ray.py): the
front has read the body (it needs the prompt to route by prefix), so the replica gets the request
as plain data and runs ember's FastAPI app on it exactly as uvicorn would, streaming each
`http.response.body` message back as the app sends it (SSE chunks stay chunks). Closing the
stream early (the client went away, the front gave up) tells the app the client disconnected,
so the engine aborts the request and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

_END = object()


@dataclass
class RawRequest:
    """An HTTP request as data (picklable, so it can cross a process boundary)."""

    method: str
    path: str
    query_string: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    client: tuple[str, int] | None = None

    def scope(self) -> dict[str, Any]:
        return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                "method": self.method, "scheme": "http", "path": self.path, "raw_path": self.path.encode(),
                "query_string": self.query_string, "root_path": "", "headers": list(self.headers),
                "client": self.client, "server": None, "state": {}}


async def call_asgi(app: Any, req: RawRequest) -> AsyncIterator[dict[str, Any]]:
    """Run `app` on `req`; yield the response's ASGI messages as the app sends them."""
    disconnected = asyncio.Event()
    sent: asyncio.Queue = asyncio.Queue()
    body_given = False

    async def receive() -> dict[str, Any]:
        nonlocal body_given
        if not body_given:
            body_given = True
            return {"type": "http.request", "body": req.body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await sent.put(message)

    async def run() -> None:
        try:
            await app(req.scope(), receive, send)
        finally:
            await sent.put(_END)

    task = asyncio.create_task(run())
    try:
        while True:
            message = await sent.get()
            if message is _END:
                break
            yield message
            if message.get("type") == "http.response.body" and not message.get("more_body", False):
                break
        await task  # the app's own exception, if it raised one
    finally:
        disconnected.set()
        if not task.done():
            # let the app see the disconnect and clean up (abort the engine request) before cancelling
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(task), timeout=5)
            task.cancel()
