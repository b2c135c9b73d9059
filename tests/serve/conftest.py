"""Fixtures for the server tests: the eval tests' tiny Llama (reused from tests/eval, not rebuilt),
served by `ember.serve` on a free localhost port in a thread, and the official openai client."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import httpx
import openai
import pytest
import torch

from ember.serve import Serving, create_app, running
from tests.eval.conftest import hf_model, local, remote, tiny_dir, tokenizer  # noqa: F401


@pytest.fixture(autouse=True)
def _one_thread():
    """Torch on one thread: the tiny model only loses to thread hand-offs, and the server's event loop
    keeps the other core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass
class Server:
    url: str
    serving: Serving

    def metric(self, name: str, **labels: str) -> float:
        """One sample of /metrics (labels other than model_name must match exactly)."""
        return metric(self.url, name, **labels)


def metric(url: str, name: str, **labels: str) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(?:{{(.*)}})? (\S+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


def make_app(model_dir, **kwargs):
    opts = dict(served_model_name="tiny", num_kv_blocks=512, log_interval=0)
    return create_app(model_dir, **{**opts, **kwargs})


@pytest.fixture(scope="session")
def server(tiny_dir):
    app = make_app(tiny_dir, max_num_seqs=16)
    with running(app) as url:
        yield Server(url, app.state.serving)


@pytest.fixture(scope="session")
def server_url(tiny_dir):
    """What the eval tests call their server: here ember serve, under the fake's model name."""
    with running(make_app(tiny_dir, served_model_name="fake-model")) as url:
        yield url


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def wait_idle(server: Server, timeout: float = 60.0) -> None:
    """Until the engine has no request and no KV block held (as /metrics shows it)."""
    deadline = time.monotonic() + timeout
    while True:
        busy = server.serving.engine.num_unfinished or server.metric("ember:kv_cache_usage_perc") > 0
        if not busy:
            return
        assert time.monotonic() < deadline, "the server did not become idle"
        time.sleep(0.05)
