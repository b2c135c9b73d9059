"""ASGI guards in front of the routes: the API key on /v1/*, and the request body size limit.

Both answer with OpenAI-style error bodies and count the refusal in `ember:request_failure`.
They are plain ASGI (not BaseHTTPMiddleware), so streamed responses pass through untouched.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ember.serve.errors import APIError, error_body


class ApiKeyGuard:
    """401 for /v1/* requests without `Authorization: Bearer <key>` (vLLM's rule: /v1 only)."""

    def __init__(self, app: ASGIApp, api_key: str, on_reject: Callable[[str], None]) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1") and scope["method"] != "OPTIONS":
            given = Headers(scope=scope).get("authorization", "").encode()
            if not secrets.compare_digest(given, self.expected):
                self.on_reject("invalid_api_key")
                body = error_body(401, "invalid or missing API key: send the header 'Authorization: Bearer <key>'",
                                  "invalid_api_key")
                await JSONResponse(body, 401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimit:
    """413 for a request body over max_bytes: by Content-Length up front, else while it is read."""

    def __init__(self, app: ASGIApp, max_bytes: int, on_reject: Callable[[str], None]) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.on_reject = on_reject

    def _error(self) -> APIError:
        return APIError(413, f"the request body is over the server's limit of {self.max_bytes} bytes",
                        "request_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            self.on_reject("request_too_large")
            e = self._error()
            await JSONResponse(error_body(e.status, e.message, e.code), e.status)(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:  # a chunked body: refused while the route reads it
                    raise self._error()
            return message

        await self.app(scope, limited, send)
