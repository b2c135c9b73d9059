"""A request through ember's app in process (ember/serve/asgi_call.py), as a Ray replica runs it:
the answer equals the offline engine's, SSE chunks stay chunks, and closing the stream aborts the request."""

from __future__ import annotations

import asyncio
import json

import pytest

from ember.engine import LLM, SamplingParams
from ember.serve.asgi_call import RawRequest, call_asgi
from tests.serve.conftest import make_app


def post(path: str, body: dict) -> RawRequest:
    return RawRequest("POST", path, headers=[(b"content-type", b"application/json")], body=json.dumps(body).encode())


async def collect(app, req: RawRequest) -> list[dict]:
    return [m async for m in call_asgi(app, req)]


@pytest.fixture(scope="module")
def app(tiny_dir):
    return make_app(tiny_dir, max_num_seqs=8)


def test_whole_and_streamed_answers(app, tiny_dir):
    prompt = "def parse(line):"
    expected = LLM(tiny_dir, num_kv_blocks=64).generate([prompt], SamplingParams(temperature=0, max_tokens=12))
    expected_text = expected[0].outputs[0].text

    async def run() -> tuple[list[dict], list[dict], list[dict]]:
        whole = await collect(app, post("/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 12,
                                                            "temperature": 0}))
        streamed = await collect(app, post("/v1/completions", {"model": "tiny", "prompt": prompt,
                                                               "max_tokens": 12, "temperature": 0, "stream": True}))
        missing = await collect(app, RawRequest("GET", "/v1/nothing"))
        await app.state.serving.engine.shutdown()
        return whole, streamed, missing

    whole, streamed, missing = asyncio.run(run())
    assert whole[0]["type"] == "http.response.start" and whole[0]["status"] == 200
    assert json.loads(b"".join(m.get("body", b"") for m in whole[1:]))["choices"][0]["text"] == expected_text
    assert dict(streamed[0]["headers"])[b"content-type"].startswith(b"text/event-stream")
    events = [m["body"] for m in streamed[1:] if m.get("body")]
    assert len(events) > 3 and events[-1].strip() == b"data: [DONE]"  # one message per SSE event, as sent
    text = "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-1]
                   if json.loads(e[6:]).get("choices"))
    assert text == expected_text
    assert missing[0]["status"] == 404
    assert json.loads(missing[1]["body"])["error"]["code"] == "not_found"


def test_closing_the_stream_aborts_the_request(tiny_dir):
    app = make_app(tiny_dir, max_num_seqs=8)
    engine = app.state.serving.engine

    async def run() -> tuple[int, int]:
        stream = call_asgi(app, post("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 400,
                                                         "ignore_eos": True, "stream": True}))
        seen = 0
        async for m in stream:
            seen += bool(m.get("body"))
            if seen == 3:
                break
        busy = engine.num_unfinished
        await stream.aclose()
        for _ in range(200):
            if engine.num_unfinished == 0:
                break
            await asyncio.sleep(0.02)
        left = engine.num_unfinished
        await engine.shutdown()
        return busy, left

    busy, left = asyncio.run(run())
    assert busy == 1 and left == 0
