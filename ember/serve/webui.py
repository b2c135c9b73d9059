"""The chat page at `/` (`ember serve --no-ui` leaves it out): static files shipped inside the package.

    GET /              ui/index.html
    GET /ui/{name}     the page's scripts and style (a fixed list, read once: no path ever reaches the disk)
    GET /v1/rag/source?path=P   the text of an indexed source document (only with --rag-index;
                                under /v1, so --api-key guards it like the rest of the API)

The page is plain HTML + ES modules with no build step and no third-party code: it talks to the
server's own /v1/models, /v1/chat/completions (streamed) and /metrics. Every file goes out with a
Content-Security-Policy that allows only this origin, so a page that tried to load or send anything
elsewhere would be blocked by the browser, not just by our good intentions.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.responses import PlainTextResponse, Response

from ember.serve.errors import APIError, bad_request
from ember.serve.serving import Serving

UI_DIR = Path(__file__).with_name("ui")
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
# 'self' only; data: for the inline favicon, blob: for the export download
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-cache"}  # revalidate: a new ember version must not run old scripts
_MAX_SOURCE_BYTES = 4 * 2 ** 20


def ui_files() -> dict[str, tuple[bytes, str]]:
    """name -> (content, media type) of every file the page is made of."""
    return {p.name: (p.read_bytes(), _TYPES[p.suffix]) for p in sorted(UI_DIR.iterdir()) if p.suffix in _TYPES}


def add_ui(app: FastAPI, serving: Serving) -> None:
    """Mount the chat page on an app (see the module docstring)."""
    files = ui_files()

    def send(name: str) -> Response:
        if name not in files:
            raise APIError(404, f"no file /ui/{name[:100]}", "not_found")
        body, media_type = files[name]
        return Response(body, media_type=media_type, headers=_HEADERS)

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)  # HEAD: uptime checks, curl -I
    async def index() -> Response:
        return send("index.html")

    @app.api_route("/ui/{name}", methods=["GET", "HEAD"], include_in_schema=False)
    async def asset(name: str) -> Response:
        return send(name)

    # In the OpenAPI document only where it can answer: without an index every call is a 400.
    @app.get("/v1/rag/source", include_in_schema=serving.grounding is not None)
    async def rag_source(path: str) -> Response:
        if serving.grounding is None:
            raise bad_request("this server has no RAG index (start it with --rag-index DIR)", "path")
        return PlainTextResponse(serving.grounding.document(path), headers={"Cache-Control": "no-store"})


def read_source(path: str, indexed: bool) -> str:
    """The text of an indexed source that is a file on this machine; 404 for anything else, so the
    route can never be used to read a file the index was not built from."""
    file = Path(path)
    if not indexed or not file.is_file():
        raise APIError(404, f"`{path[:200]}` is not a file of the RAG index", "not_found", "path")
    with file.open("rb") as f:
        data = f.read(_MAX_SOURCE_BYTES + 1)
    text = data[:_MAX_SOURCE_BYTES].decode("utf-8", errors="replace")
    return text + ("\n[... cut at 4 MiB]" if len(data) > _MAX_SOURCE_BYTES else "")
