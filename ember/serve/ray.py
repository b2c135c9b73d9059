"""ember's server as a Ray Serve application: N engine replicas behind one HTTP port.

    ember serve --model DIR --replicas 2 --replica-cpus 1                 # a local Ray, port 8000
    ember serve --model DIR --min-replicas 1 --max-replicas 8 --ray-address auto   # autoscaled, on a cluster
    serve run ember.serve.ray:build_app model=DIR replicas=2              # Ray's own CLI, same flags
    app = build_app(ServeConfig(model=DIR, replicas=2)); serve.run(app)   # from Python

Three deployments, one application:

    HTTP -> Ray proxy -> EmberFront (num_cpus 0)   --handle, PrefixAffinityRouter--> EmberReplica x N
                         GET /metrics: every replica's, merged          one engine each (ember's FastAPI
                         GET /fleet/targets: Prometheus http_sd         app, @serve.ingress), own /metrics
                                          ^---------- EmberFleet (num_cpus 0) <-- heartbeats

EmberReplica is ember's FastAPI app (serve/app.py, built by `ember serve`'s own `build`) as a
Ray Serve ingress deployment: one engine per replica, `max_ongoing_requests` = the engine's
max_num_seqs + max_queue_len (Ray's default of 5 would starve continuous batching),
`num_cpus` / `num_gpus` per replica, fixed or autoscaled (min/max replicas, target ongoing
requests). EmberFront, the application's HTTP entry, reads each request, hashes its prompt's
leading blocks (prefix_routing.py) and hands it to a replica through a deployment handle whose
router (ray_router.py) prefers the replica that already holds that prefix in its KV cache; the
replica runs the request through its app in process (asgi_call.py) and streams the ASGI messages
back, so SSE chunks pass through unchanged and the OpenAI client sees one endpoint.

Failures: a replica that dies before its response has begun (for a non-streamed request: before
the whole answer) is retried on another replica, up to `RETRIES` times; Ray restarts the dead
one. A stream that has already sent tokens cannot be replayed: it ends with an OpenAI-style error
event. A replica whose engine failed reports unhealthy (check_health) and Ray replaces it.

Metrics: each replica serves its registry on its own port with a `replica` label
(fleet_metrics.py) and heartbeats that address to EmberFleet; the front lists the live ones for
Prometheus (`/fleet/targets`) and merges them at `/metrics`, with its own counters:
ember:fleet_replicas (replicas read at this scrape), ember:fleet_request_retries_total,
ember:fleet_broken_streams_total.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from ember.commands.serve import ServeConfig, ServeConfigError
from ember.errors import EmberError

log = logging.getLogger("ember.serve")

APP_NAME = "ember"
RETRIES = 3  # replicas tried for a request whose replica died before answering
HEARTBEAT_S = 5.0  # how often a replica re-registers its metrics address
TARGET_MAX_AGE_S = 30.0  # a replica unheard of for this long is no longer listed


def require_ray_extra() -> None:
    import importlib.util

    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None:
        raise ServeConfigError("--replicas runs on Ray Serve, which is not installed: pip install 'ember[ray]'")


require_ray_extra()

import httpx  # noqa: E402
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest  # noqa: E402
import ray  # noqa: E402
from ray import serve  # noqa: E402
from ray.exceptions import ActorUnavailableError, RayActorError  # noqa: E402
from ray.serve.handle import DeploymentHandle  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse, Response  # noqa: E402

from ember.serve.asgi_call import RawRequest, call_asgi  # noqa: E402
from ember.serve.errors import error_body  # noqa: E402
from ember.serve.fleet_metrics import ReplicaMetricsServer, http_sd_targets, merge_expositions  # noqa: E402
from ember.serve.prefix_routing import prefix_hashes  # noqa: E402

_RETRYABLE = (RayActorError, ActorUnavailableError)


# ---- the fleet registry ------------------------------------------------------------------------
class EmberFleet:
    """Where each live replica serves its metrics (replicas heartbeat; stale entries drop out)."""

    def __init__(self) -> None:
        self._replicas: dict[str, dict[str, Any]] = {}

    def register(self, replica: str, url: str, pid: int, node: str) -> None:
        self._replicas[replica] = {"url": url, "pid": pid, "node": node, "seen": time.monotonic()}

    def unregister(self, replica: str) -> None:
        self._replicas.pop(replica, None)

    def replicas(self, max_age: float = TARGET_MAX_AGE_S) -> dict[str, dict[str, Any]]:
        now = time.monotonic()
        return {r: {k: v for k, v in info.items() if k != "seen"}
                for r, info in self._replicas.items() if now - info["seen"] <= max_age}


# ---- an engine replica -------------------------------------------------------------------------
class EmberReplica:
    """One engine and ember's FastAPI app (see the module docstring); `forward` serves the front."""

    async def __init__(self, cfg: ServeConfig, fleet: DeploymentHandle) -> None:
        from ember.commands.serve import build

        self._app = build(cfg)
        ctx = serve.get_replica_context()
        self.replica = f"{ctx.deployment}#{ctx.replica_id.unique_id}"  # Ray's own name for it in its logs
        node = ray.util.get_node_ip_address()
        # a server bound to loopback keeps its replicas' metrics on loopback too (one machine);
        # otherwise Prometheus reaches them at the node's address
        local = cfg.host in ("127.0.0.1", "localhost", "::1")
        self._metrics = ReplicaMetricsServer(self._app.state.serving.metrics.registry, self.replica,
                                             host="127.0.0.1" if local else "0.0.0.0",
                                             port=cfg.replica_metrics_port, advertise_host=None if local else node)
        self._fleet = fleet
        self._node = node
        await self._register()  # listed before the application reports ready, then kept fresh
        self._heartbeat = asyncio.get_running_loop().create_task(self._beat())
        log.info("replica %s: engine ready, metrics at %s", self.replica, self._metrics.url)

    def __serve_build_asgi_app__(self) -> Any:
        return self._app

    async def _register(self) -> None:
        try:
            await self._fleet.register.remote(self.replica, self._metrics.url, os.getpid(), self._node)
        except Exception as e:  # the registry restarting: try again next beat
            log.warning("replica %s: could not register its metrics address: %s", self.replica, e)

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            await self._register()

    async def forward(self, req: RawRequest, prefix_hashes: list[int] | None = None) -> AsyncIterator[dict]:
        """The request through this replica's app; its ASGI messages as they are sent (prefix_hashes is
        for the router, which reads it from the call's arguments)."""
        async for message in call_asgi(self._app, req):
            yield message

    def check_health(self) -> None:
        errored = self._app.state.serving.engine.errored
        if errored is not None:
            raise RuntimeError(f"the engine stopped: {errored}")

    async def __del__(self) -> None:
        self._heartbeat.cancel()
        self._metrics.close()


# ---- the HTTP entry ----------------------------------------------------------------------------
class EmberFront:
    """Reads each request, routes it by prompt prefix to a replica, relays the answer (module docstring).
    A plain deployment, not a second @serve.ingress: Ray Serve allows one per application, and that
    one is ember's own app in the replicas."""

    async def __init__(self, replicas: DeploymentHandle, fleet: DeploymentHandle, prefix_routing: bool,
                       max_body_bytes: int) -> None:
        self._replicas = replicas.options(stream=True)
        self._fleet = fleet
        self._prefix_routing = prefix_routing
        self._max_body = max_body_bytes
        self._http = httpx.AsyncClient(timeout=10)
        self._registry = CollectorRegistry()
        self._retries = Counter("ember:fleet_request_retries", "Requests sent again because their replica died "
                                "before answering.", registry=self._registry)
        self._broken = Counter("ember:fleet_broken_streams", "Streams cut short by their replica dying after "
                               "tokens were sent.", registry=self._registry)
        self._live = Gauge("ember:fleet_replicas", "Engine replicas whose metrics were read at this scrape.",
                           registry=self._registry)

    async def __call__(self, request: Request) -> Response:
        path = request.url.path
        if request.method == "GET" and path == "/metrics":
            return await self._metrics()
        if request.method == "GET" and path == "/fleet/targets":
            replicas = await self._fleet.replicas.remote()
            return JSONResponse(http_sd_targets({r: info["url"] for r, info in replicas.items()}))
        return await self._forward(request)

    async def _metrics(self) -> Response:
        replicas = await self._fleet.replicas.remote()

        async def scrape(replica: str, url: str) -> str:
            try:
                r = await self._http.get(url)
                r.raise_for_status()
                return r.text
            except httpx.ConnectError:  # nothing listens there: the replica is gone
                await self._fleet.unregister.remote(replica)
            except httpx.HTTPError as e:
                log.warning("metrics of replica %s unreadable: %s", replica, e)
            return ""

        texts = await asyncio.gather(*(scrape(r, info["url"]) for r, info in replicas.items()))
        self._live.set(sum(1 for t in texts if t))
        return Response(merge_expositions([*texts, generate_latest(self._registry).decode()]),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    async def _forward(self, request: Request) -> Response:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self._max_body:
                return JSONResponse(error_body(413, f"request body over {self._max_body} bytes: send less",
                                               "request_too_large"), 413)
        req = RawRequest(request.method, request.url.path, request.url.query.encode(),
                         [(bytes(k), bytes(v)) for k, v in request.headers.raw], bytes(body),
                         (request.client.host, request.client.port) if request.client else None)
        hashes = prefix_hashes(req.path, req.body) if self._prefix_routing and req.method == "POST" else []
        error: BaseException | None = None
        for _ in range(RETRIES):
            stream = self._replicas.forward.remote(req, prefix_hashes=hashes)
            try:
                head = [await stream.__anext__()]
                while not _has_content(head[-1]):
                    head.append(await stream.__anext__())  # nothing sent to the client yet: still retryable
            except _RETRYABLE as e:
                error = e
                log.warning("replica died before answering; retrying on another: %s", _first_line(e))
                self._retries.inc()
                stream.cancel()
                continue
            except StopAsyncIteration:
                error = RuntimeError("the replica ended the response before sending it")
                continue
            return _Relay(head, stream, self._broken)
        reason = _first_line(error) if error is not None else "no replica"
        return JSONResponse(error_body(503, f"no engine replica could take the request: {reason}",
                                       "replica_unavailable"), 503)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _has_content(message: dict) -> bool:
    """A body message with bytes in it, or the last one: after it the response has begun."""
    return message["type"] == "http.response.body" and bool(message.get("body") or not message.get("more_body"))


class _Relay(Response):
    """A replica's ASGI messages sent on as they come; a replica dying mid-stream ends an SSE stream with
    an OpenAI-style error event (what was sent cannot be taken back)."""

    def __init__(self, head: list[dict], stream: Any, broken: Counter) -> None:
        self.head, self.stream, self.broken = head, stream, broken
        self.background = None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        start = self.head[0]
        sse = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in start["headers"])
        try:
            for message in self.head:
                await send(message)
            if not self.head[-1].get("more_body"):
                return
            async for message in self.stream:
                await send(message)
        except _RETRYABLE as e:
            log.warning("replica died during a response: %s", _first_line(e))
            self.broken.inc()
            event = error_body(502, f"the engine replica serving this stream failed: {_first_line(e)}",
                               "replica_failed")
            tail = b"data: " + json.dumps(event).encode() + b"\n\n" if sse else b""
            await send({"type": "http.response.body", "body": tail, "more_body": False})
        finally:
            self.stream.cancel()  # a no-op once finished; otherwise the replica aborts the request


# ---- building and running the application ------------------------------------------------------
def replica_options(cfg: ServeConfig) -> dict[str, Any]:
    """The EmberReplica deployment's options for a config (see the module docstring)."""
    opts: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": cfg.replica_cpus, "num_gpus": cfg.replica_gpus},
        "max_ongoing_requests": cfg.max_num_seqs + cfg.max_queue_len,
        "graceful_shutdown_timeout_s": cfg.drain_timeout,
        "logging_config": {"enable_access_log": cfg.access_log},  # Ray's access log is the replicas' one
        "request_router_config": {"request_router_class": "ember.serve.ray_router.PrefixAffinityRouter"},
    }
    if cfg.min_replicas is not None:
        opts["num_replicas"] = "auto"
        opts["autoscaling_config"] = {
            "min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
            "initial_replicas": cfg.replicas if cfg.replicas is not None else max(cfg.min_replicas, 1),
            "target_ongoing_requests": cfg.target_ongoing_requests or max(1.0, cfg.max_num_seqs / 2)}
    else:
        opts["num_replicas"] = cfg.replicas
    return opts


def _replica_config(cfg: ServeConfig) -> ServeConfig:
    """What each replica builds: its torch threads from its CPU share, a GPU when it has one."""
    threads = cfg.threads or max(1, int(cfg.replica_cpus))
    device = cfg.device or ("cuda" if cfg.replica_gpus > 0 else None)
    return dataclasses.replace(cfg, threads=threads, device=device)


def build_app(cfg: ServeConfig | dict[str, Any]) -> "serve.Application":
    """The Ray Serve application for a ServeConfig, or for `serve run` arguments (key=value, the flags'
    names) which are checked as the CLI checks them."""
    from ember.checkpoint.registry import resolve_model_path
    from ember.cliconfig import make_config

    if isinstance(cfg, dict):
        cfg = make_config(ServeConfig, {str(k).replace("-", "_"): v for k, v in cfg.items()}, "serve run")
    if not resolve_model_path(cfg.model).exists():  # here, not in every replica's constructor retries
        raise ServeConfigError(f"--model {cfg.model} does not exist: give a model folder (config.json + weights), "
                               "a .gguf file or an installed model's name")
    if cfg.replicas is None and cfg.min_replicas is None:
        cfg = dataclasses.replace(cfg, replicas=1)
    fleet = serve.deployment(EmberFleet, name="EmberFleet", num_replicas=1, ray_actor_options={"num_cpus": 0},
                             logging_config={"enable_access_log": False}).bind()  # not a line per heartbeat
    replica_cls = serve.ingress()(EmberReplica)
    replicas = serve.deployment(replica_cls, name="EmberReplica", **replica_options(cfg)).bind(
        _replica_config(cfg), fleet)
    return serve.deployment(EmberFront, name="EmberFront", num_replicas=1, max_ongoing_requests=100_000,
                            ray_actor_options={"num_cpus": 0},
                            logging_config={"enable_access_log": cfg.access_log}).bind(
        replicas, fleet, cfg.prefix_routing, int(cfg.max_body_mb * 2 ** 20))


def start_ray(address: str | None, **init_kwargs: Any) -> bool:
    """Join the cluster at `address` (or $RAY_ADDRESS), else start a local Ray for this process. A local
    Ray's workers import this very ember (the checkout this process runs), not another installed copy;
    a cluster's nodes need ember installed (the Dockerfile in deploy/kserve builds such an image).
    True when this process started (and so owns) the Ray it runs on."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address is None:
        import ember

        here = os.path.dirname(os.path.dirname(os.path.abspath(ember.__file__)))
        path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
        init_kwargs.setdefault("runtime_env", {"env_vars": {"PYTHONPATH": path}})
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, **init_kwargs)
    except ConnectionError as e:
        raise EmberError(f"--ray-address {address}: no Ray cluster there ({e})") from None
    return address is None


def run_fleet(cfg: ServeConfig) -> None:
    """`ember serve --replicas N`: deploy, serve until SIGTERM / Ctrl-C, then take the application down."""
    app = build_app(cfg)
    own_ray = start_ray(cfg.ray_address)
    # ours from here on (deploying included): Ray's own driver handler would abort the process
    stop = threading.Event()
    before = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        serve.run(app, name=APP_NAME, route_prefix="/")
        count = (f"{cfg.replicas} replica{'s' if cfg.replicas != 1 else ''}" if cfg.min_replicas is None
                 else f"{cfg.min_replicas}..{cfg.max_replicas} replicas (autoscaled)")
        log.info("serving %s on Ray Serve, %s, on http://%s:%d/v1 (metrics of every replica: /metrics, "
                 "Prometheus targets: /fleet/targets)", cfg.model, count, cfg.host, cfg.port)
        while not stop.wait(1.0):
            pass
    finally:
        log.info("shutting down: draining replicas for at most %.0f s", cfg.drain_timeout)
        try:
            serve.delete(APP_NAME)  # on a shared cluster, only ember's application goes
            if own_ray:
                serve.shutdown()
            ray.shutdown()
        finally:
            for s, handler in before.items():
                signal.signal(s, handler)
