"""ember on Ray Serve (ember/serve/ray.py): two engine replicas (1 CPU each) behind one port, one
module-scoped local Ray cluster for every test here (starting Ray is the slow part on 2 cores).

The official openai client gets whole and streamed answers equal to the offline engine's; requests
spread over both replicas and the merged /metrics shows it per replica; prompts sharing a prefix stay
on one replica; 64 concurrent streams get no 5xx; and killing a replica's process mid-load loses no
request it had not started answering (the front retries it), after which Ray restarts the replica.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time

import httpx
import openai
import pytest

pytest.importorskip("ray.serve", reason="pip install 'ember[ray]'")

from ray import serve  # noqa: E402

from ember.commands.serve import ServeConfig  # noqa: E402
from ember.engine import LLM, SamplingParams  # noqa: E402
from ember.serve.ray import APP_NAME, build_app, start_ray  # noqa: E402
from tests.serve.conftest import metric  # noqa: E402

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def replicas(url: str) -> dict[str, float]:
    """replica id -> requests it finished, from the front's merged /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        if family.name == "ember:request_success":
            for s in family.samples:
                if s.name.endswith("_total"):
                    out[s.labels["replica"]] = out.get(s.labels["replica"], 0.0) + s.value
        if family.name == "ember:num_requests_running":
            for s in family.samples:
                out.setdefault(s.labels["replica"], 0.0)
    return out


def fleet_info() -> dict[str, dict]:
    handle = serve.get_deployment_handle("EmberFleet", APP_NAME)
    return handle.replicas.remote().result()


def wait_for(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def fleet(tiny_dir):
    import ray

    t0 = time.monotonic()
    start_ray(None, num_cpus=2, object_store_memory=150 * 2 ** 20)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = ServeConfig(model=tiny_dir, served_model_name="tiny", replicas=2, replica_cpus=1, num_kv_blocks=512,
                      max_num_seqs=32, log_interval=0, access_log=False)
    serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: len(fleet_info()) == 2, 60, "both replicas to register their metrics")
    print(f"\nRay + 2 replicas up in {time.monotonic() - t0:.1f} s")
    try:
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture
def client(fleet) -> openai.OpenAI:
    return openai.OpenAI(base_url=fleet + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_openai_client_whole_and_streamed(fleet, client, tiny_dir):
    prompt = "def parse(line):"
    offline = LLM(tiny_dir, num_kv_blocks=64).generate([prompt], SamplingParams(temperature=0, max_tokens=16))
    whole = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0)
    assert whole.choices[0].text == offline[0].outputs[0].text
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == offline[0].outputs[0].text
    assert chunks[-1].usage.completion_tokens == 16
    messages = [{"role": "user", "content": "What is a tuple?"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    streamed = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                                   stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == chat.choices[0].message.content
    assert [m.id for m in client.models.list().data] == ["tiny"]
    with pytest.raises(openai.NotFoundError):  # the replica's own OpenAI-style errors pass through
        client.completions.create(model="other", prompt="x", max_tokens=1)
    assert httpx.get(fleet + "/health", timeout=30).status_code == 200
    # the front reads bodies whole (it routes by them), so it enforces --max-body-mb itself
    big = httpx.post(fleet + "/v1/completions", content=b"x" * (16 * 2 ** 20 + 1), timeout=60,
                     headers={"content-type": "application/json"})
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"


def test_requests_spread_over_both_replicas_and_metrics_say_so(fleet, client):
    before = replicas(fleet)
    assert len(before) == 2

    async def send_all() -> None:
        async with openai.AsyncOpenAI(base_url=fleet + "/v1", api_key="unused", max_retries=0) as c:
            await asyncio.gather(*(c.completions.create(model="tiny", prompt=f"{i} unrelated prompt number {i}",
                                                        max_tokens=24, extra_body={"ignore_eos": True})
                                   for i in range(24)))

    asyncio.run(send_all())
    after = replicas(fleet)
    served = {r: after[r] - before.get(r, 0.0) for r in after}
    assert sum(served.values()) == 24
    assert all(n >= 3 for n in served.values()), served   # both took a share
    # each replica is also a Prometheus target of its own, listed for http_sd
    targets = httpx.get(fleet + "/fleet/targets", timeout=30).json()
    assert len(targets) == 2
    for group in targets:
        text = httpx.get(f"http://{group['targets'][0]}{group['labels']['__metrics_path__']}", timeout=30).text
        assert 'replica="EmberReplica#' in text and "ember:num_requests_running{" in text
    assert metric(fleet, "ember:fleet_replicas") == 2


def test_shared_prefix_stays_on_one_replica(fleet, client):
    before = replicas(fleet)
    hits = metric(fleet, "ember:prefix_cache_hits_total")
    shared = "A long shared system prompt about the Python data model and its special methods. " * 4
    for i in range(6):
        client.completions.create(model="tiny", prompt=shared + f"Question {i}?", max_tokens=2)
    after = replicas(fleet)
    served = sorted(after[r] - before.get(r, 0.0) for r in after)
    assert served == [0, 6]
    assert metric(fleet, "ember:prefix_cache_hits_total") - hits >= 5 * 16 * 4  # >= 4 blocks hit, 5 times


def test_64_concurrent_streams_no_5xx(fleet):
    async def one(c: httpx.AsyncClient, i: int) -> tuple[int, bool]:
        body = {"model": "tiny", "prompt": f"stream {i}: ", "max_tokens": 32, "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True}}
        async with c.stream("POST", fleet + "/v1/completions", json=body) as r:
            lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
        usage = json.loads(lines[-2][6:])["usage"] if len(lines) > 1 else {}
        return r.status_code, lines[-1] == "data: [DONE]" and usage.get("completion_tokens") == 32

    async def run() -> list[tuple[int, bool]]:
        async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=64)) as c:
            return await asyncio.gather(*(one(c, i) for i in range(64)))

    results = asyncio.run(run())
    assert [s for s, _ in results] == [200] * 64
    assert all(done for _, done in results)


def test_killing_a_replica_mid_load_loses_no_retryable_request(fleet):
    """Non-streamed requests are all answered (the front retries those the dead replica had not answered);
    a stream that had sent tokens ends with an OpenAI-style error event, never a hang or a 5xx."""
    info = fleet_info()
    victim, target = next(iter(info.items()))
    retries = metric(fleet, "ember:fleet_request_retries_total")
    broken = metric(fleet, "ember:fleet_broken_streams_total")

    async def whole(c: httpx.AsyncClient, i: int) -> int:
        body = {"model": "tiny", "prompt": f"load {i} ", "max_tokens": 400, "ignore_eos": True}
        r = await c.post(fleet + "/v1/completions", json=body)
        assert r.status_code != 200 or json.loads(r.text)["usage"]["completion_tokens"] == 400
        return r.status_code

    async def streamed(c: httpx.AsyncClient, i: int) -> tuple[int, str]:
        body = {"model": "tiny", "prompt": f"stream {i} ", "max_tokens": 400, "ignore_eos": True, "stream": True}
        async with c.stream("POST", fleet + "/v1/completions", json=body) as r:
            lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
        if lines[-1] == "data: [DONE]":
            return r.status_code, "done"
        return r.status_code, json.loads(lines[-1][6:])["error"]["code"]

    async def run() -> tuple[list[int], list[tuple[int, str]]]:
        async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=64)) as c:
            wholes = [asyncio.create_task(whole(c, i)) for i in range(24)]
            streams = [asyncio.create_task(streamed(c, i)) for i in range(8)]
            # kill the victim once it is generating for some of them (its own metrics say so)
            deadline = time.monotonic() + 60
            while metric(target["url"].removesuffix("/metrics"), "ember:num_requests_running") < 4:
                assert time.monotonic() < deadline, "the victim never got requests"
                await asyncio.sleep(0.05)
            os.kill(target["pid"], signal.SIGKILL)
            return await asyncio.gather(*wholes), await asyncio.gather(*streams)

    statuses, stream_ends = asyncio.run(run())
    assert statuses == [200] * 24
    assert metric(fleet, "ember:fleet_request_retries_total") - retries >= 1
    assert all(status == 200 and end in ("done", "replica_failed") for status, end in stream_ends), stream_ends
    assert metric(fleet, "ember:fleet_broken_streams_total") - broken == sum(e == "replica_failed"
                                                                             for _, e in stream_ends)
    # Ray restarts the replica: two live replicas again, one of them new
    after = wait_for(lambda: (lambda f: f if len(f) == 2 and victim not in f else None)(fleet_info()), 120,
                     "Ray to replace the killed replica")
    assert target["pid"] not in [i["pid"] for i in after.values()]
    r = httpx.post(fleet + "/v1/completions", json={"model": "tiny", "prompt": "after", "max_tokens": 4}, timeout=60)
    assert r.status_code == 200
