"""ember.serve: the OpenAI-compatible HTTP server over the serving engine, and its load generator.

    from ember.serve import create_app, running
    app = create_app("runs/quickstart/base", served_model_name="qs", max_num_seqs=32)
    with running(app) as url:                      # or `ember serve --model DIR` in a shell
        openai.OpenAI(base_url=url + "/v1", api_key="none").completions.create(...)

Layout: protocol.py (request schemas), serving.py (shared checks, admission, request lifetime),
completions.py / chat.py (the two generation endpoints), logprobs.py (their logprob shapes),
streaming.py (SSE, disconnects), metrics.py (Prometheus), middleware.py (API key, body limit),
errors.py (OpenAI error bodies), app.py (routes), server.py (uvicorn, SIGTERM drain),
loadgen.py (`ember bench serve`), structured.py (response_format / guided_* -> a constraint),
tools.py + tool_parsers.py (tool calling), openapi.py + responses.py (/openapi.json), webui.py + ui/
(the chat page at /), ray.py + ray_router.py + prefix_routing.py + asgi_call.py + fleet_metrics.py
(replicas on Ray Serve, imported only when used: `pip install 'ember[ray]'`).
"""

from ember.serve.app import build_app, create_app
from ember.serve.server import running, serve
from ember.serve.serving import Serving

__all__ = ["Serving", "build_app", "create_app", "running", "serve"]
