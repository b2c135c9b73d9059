"""Disconnects free their KV blocks, 256 concurrent streams all finish, overload answers 429 and
recovers."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx

from ember.serve import running
from tests.serve.conftest import Server, make_app, wait_idle

LONG = {"prompt": "Once upon a time", "max_tokens": 480, "ignore_eos": True, "temperature": 0}


def test_streaming_client_that_leaves_frees_its_blocks(server) -> None:
    wait_idle(server)
    gone = server.metric("ember:request_failure_total", reason="client_disconnected")
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", server.url + "/v1/completions", json={**LONG, "n": 4, "stream": True}) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert all(g.startswith("data: {") or not g for g in got)
            assert server.metric("ember:kv_cache_usage_perc") > 0  # the request holds blocks now
    wait_idle(server)  # closed mid-stream: aborted, every block back
    assert server.metric("ember:kv_cache_usage_perc") == 0
    assert server.metric("ember:request_failure_total", reason="client_disconnected") == gone + 1
    assert httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_non_streaming_client_that_leaves_is_aborted(server) -> None:
    wait_idle(server)
    done = server.metric("ember:request_success_total")
    body = json.dumps({**LONG, "n": 16}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 30
        while not server.serving.engine.num_unfinished:  # wait until it runs, then hang up
            assert time.monotonic() < deadline
            time.sleep(0.01)
    wait_idle(server)
    assert server.metric("ember:request_success_total") == done  # aborted, not finished
    assert server.metric("ember:kv_cache_usage_perc") == 0


async def _stream_all(url: str, n: int, body: dict) -> list[tuple[int, str, int]]:
    """n concurrent streaming completions; per client (status, last event, text pieces)."""
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        async def one(i: int) -> tuple[int, str, int]:
            pieces, last = 0, ""
            async with client.stream("POST", url + "/v1/completions",
                                     json={**body, "prompt": f"Request {i}:", "stream": True}) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        last = line[6:]
                        pieces += last != "[DONE]" and '"text"' in last
                return r.status_code, last, pieces

        return await asyncio.gather(*(one(i) for i in range(n)))


def test_256_concurrent_streams_all_complete(tiny_dir) -> None:
    app = make_app(tiny_dir, max_num_seqs=64, num_kv_blocks=2048)
    with running(app) as url:
        results = asyncio.run(_stream_all(url, 256, {"max_tokens": 16, "ignore_eos": True}))
        assert [s for s, _, _ in results] == [200] * 256
        assert all(last == "[DONE]" and pieces >= 1 for _, last, pieces in results)
        srv = Server(url, app.state.serving)
        wait_idle(srv)
        assert srv.metric("ember:request_success_total", finished_reason="length") == 256
        assert srv.metric("ember:request_failure_total") == 0
        assert srv.metric("ember:e2e_request_latency_seconds_count") == 256


def test_overload_gets_429_then_recovers(tiny_dir) -> None:
    app = make_app(tiny_dir, max_num_seqs=2, max_queue_len=2)
    with running(app) as url:
        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=24)) as c:
                body = {"prompt": "Overload", "max_tokens": 64, "ignore_eos": True}
                return await asyncio.gather(*(c.post(url + "/v1/completions", json=body) for _ in range(24)))

        codes = [r.status_code for r in asyncio.run(burst())]
        assert max(codes) < 500 and set(codes) <= {200, 429}
        assert 4 <= codes.count(200) < 24  # 2 running + 2 queued at least; the rest refused
        refused = next(r for r in asyncio.run(burst()) if r.status_code == 429)
        assert refused.headers["Retry-After"] == "1" and refused.json()["error"]["code"] == "queue_full"
        srv = Server(url, app.state.serving)
        wait_idle(srv)
        ok = httpx.post(url + "/v1/completions", json={"prompt": "after", "max_tokens": 4}, timeout=60)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4
        assert srv.metric("ember:request_failure_total", reason="queue_full") >= codes.count(429)
