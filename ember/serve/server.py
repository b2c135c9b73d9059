"""Running the app under uvicorn: in the foreground with a SIGTERM drain, or in a thread.

    serve(app, host="127.0.0.1", port=8000, drain_timeout=30)    # blocks; `ember serve` uses it
    with running(app) as url: ...                                # a free localhost port, in a thread

On SIGTERM or Ctrl-C the server stops accepting connections, lets the requests in flight finish
(streams included) for at most `drain_timeout` seconds, cancels what is left (aborting those
requests), shuts the engine down and returns; a second Ctrl-C forces the exit. Unlike plain
uvicorn it does not re-raise the signal afterwards, so a drained server exits with status 0.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading
import time
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI

log = logging.getLogger("ember.serve")


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        sigs = (signal.SIGINT, signal.SIGTERM)
        before = {s: signal.signal(s, self.handle_exit) for s in sigs}
        try:
            yield
        finally:
            for s, handler in before.items():
                signal.signal(s, handler)

    def handle_exit(self, sig: int, frame: object) -> None:
        if not self.should_exit:
            log.info("%s: draining requests in flight (at most %.0f s)", signal.Signals(sig).name,
                     self.config.timeout_graceful_shutdown or 0)
        super().handle_exit(sig, frame)


def _config(app: FastAPI, drain_timeout: float, log_level: str, access_log: bool, **kw: object) -> uvicorn.Config:
    return uvicorn.Config(app, timeout_graceful_shutdown=max(drain_timeout, 0.1), log_level=log_level,
                          access_log=access_log, log_config=None, **kw)


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, drain_timeout: float = 30.0,
          log_level: str = "info", access_log: bool = True) -> None:
    """Serve until SIGTERM / Ctrl-C, then drain (see the module docstring)."""
    _Server(_config(app, drain_timeout, log_level, access_log, host=host, port=port)).run()
    log.info("server stopped")


@contextlib.contextmanager
def running(app: FastAPI, drain_timeout: float = 5.0, log_level: str = "warning") -> Iterator[str]:
    """Run the app on 127.0.0.1 at a free port in a daemon thread; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = _Server(_config(app, drain_timeout, log_level, access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="ember-serve")
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            sock.close()
            raise RuntimeError("the server did not start; see the log above")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=drain_timeout + 10)
        sock.close()
