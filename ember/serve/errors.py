"""OpenAI-style error responses: every failure of the server is one JSON body of this shape.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": "invalid_value"}}

`APIError` is raised by handlers; `error_response` builds the body for it, for pydantic's
validation errors (400 naming the field), for Starlette's HTTP errors (404 unknown route, 405)
and for anything unexpected (500, logged with its traceback). The `code` is also the `reason`
label of the `ember:request_failure` counter.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from starlette.responses import JSONResponse

# HTTP status -> OpenAI's error type
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          500: "server_error", 503: "server_error"}


class APIError(Exception):
    """A request the server refuses or cannot serve; becomes an OpenAI-style error response."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, code, param)


def error_body(status: int, message: str, code: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error_body(error.status, error.message, error.code, error.param),
                        status_code=error.status, headers=error.headers)


def validation_error(e: ValidationError) -> APIError:
    """pydantic's first complaint as a 400 naming the field (`messages.0.role`), or bad JSON."""
    errors = e.errors(include_url=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        return bad_request(f"the request body is not valid JSON: {first['msg']}", code="invalid_json")
    path, tag = _split(first["loc"])
    if not path:
        return bad_request(f"the request body must be a JSON object: {first['msg']}", code="invalid_type")
    if tag is None:
        return bad_request(f"{path}: {first['msg']}", param=path)
    # A union field (prompt, stop, content): pydantic reports each alternative; name them all.
    tags = [t for p, t in map(lambda x: _split(x["loc"]), errors) if p == path and t is not None]
    kinds = " or ".join(dict.fromkeys(_KINDS.get(t, "an object") for t in tags))
    return bad_request(f"{path}: expected {kinds}", param=path)


# pydantic's union member tags -> words for the error message
_KINDS = {"str": "a string", "int": "an integer", "float": "a number", "bool": "a boolean",
          "list[str]": "a list of strings", "list[int]": "a list of token ids",
          "list[list[int]]": "a list of token-id lists", "list[ContentPart]": "a list of content parts",
          "dict[str,any]": "an object", "none": "null"}


def _split(loc: tuple) -> tuple[str, str | None]:
    """('stop', 'list[str]', 0) -> ('stop', 'list[str]'): the field path and the union member, if any."""
    parts: list[str] = []
    for p in loc:
        if isinstance(p, str) and ("[" in p or p in _KINDS or p[:1].isupper()):
            return ".".join(parts), p
        parts.append(str(p))
    return ".".join(parts), None
