"""Every failure is an OpenAI-style error, never a 5xx or a stuck request: a table of malformed
requests, a hypothesis fuzz of field values, the API key, the body limit, unknown routes."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ember.serve import running
from tests.serve.conftest import make_app, wait_idle

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]


def check_error(r: httpx.Response, status: int | None = None) -> dict:
    """An OpenAI-style error body with a readable message; returns the error."""
    assert r.status_code < 500, r.text
    if status is not None:
        assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "code"} and isinstance(err["message"], str) and err["message"]
    return err


CASES = [  # (path, raw body, status, a word the message must contain)
    (COMPLETIONS, b"{", 400, "JSON"),
    (COMPLETIONS, b"", 400, "JSON"),
    (COMPLETIONS, b"\xff\xfe", 400, "JSON"),
    (COMPLETIONS, b"[1, 2]", 400, "object"),
    (COMPLETIONS, b"null", 400, "object"),
    (COMPLETIONS, b"[" * 5000 + b"]" * 5000, 400, "JSON"),
    (COMPLETIONS, b'{"max_tokens": 3}', 400, "prompt"),
    (COMPLETIONS, b'{"prompt": 3}', 400, "prompt"),
    (COMPLETIONS, b'{"prompt": []}', 400, "prompt"),
    (COMPLETIONS, b'{"prompt": [[]]}', 400, "empty"),
    (COMPLETIONS, b'{"prompt": [1, "a"]}', 400, "prompt"),
    (COMPLETIONS, b'{"prompt": [5, 99999]}', 400, "vocabulary"),
    (COMPLETIONS, b'{"prompt": [-1]}', 400, "vocabulary"),
    (COMPLETIONS, b'{"prompt": "x", "temperature": -1}', 400, "temperature"),
    (COMPLETIONS, b'{"prompt": "x", "temperature": "hot"}', 400, "temperature"),
    (COMPLETIONS, b'{"prompt": "x", "temperature": NaN}', 400, "temperature"),
    (COMPLETIONS, b'{"prompt": "x", "top_p": 0}', 400, "top_p"),
    (COMPLETIONS, b'{"prompt": "x", "n": 0}', 400, "n"),
    (COMPLETIONS, b'{"prompt": "x", "n": 100000}', 400, "n"),
    (COMPLETIONS, b'{"prompt": "x", "max_tokens": -5}', 400, "max_tokens"),
    (COMPLETIONS, b'{"prompt": "x", "max_tokens": 0}', 400, "echo"),
    (COMPLETIONS, b'{"prompt": "x", "max_tokens": 100000000000000000000}', 400, "context length"),
    (COMPLETIONS, b'{"prompt": "x", "logprobs": 999}', 400, "logprobs"),
    (COMPLETIONS, b'{"prompt": "x", "stop": [1]}', 400, "stop"),
    (COMPLETIONS, b'{"prompt": "x", "stop": [""]}', 400, "stop"),
    (COMPLETIONS, b'{"prompt": "x", "stop_token_ids": [10000000]}', 400, "vocabulary"),
    (COMPLETIONS, b'{"prompt": "x", "logit_bias": {"abc": 1}}', 400, "logit_bias"),
    (COMPLETIONS, b'{"prompt": "x", "logit_bias": {"5": 1000}}', 400, "logit_bias"),
    (COMPLETIONS, b'{"prompt": "x", "seed": 1e30}', 400, "seed"),
    (COMPLETIONS, b'{"prompt": "x", "seed": 100000000000000000000000}', 400, "seed"),
    (COMPLETIONS, b'{"prompt": "x", "min_tokens": 20, "max_tokens": 5}', 400, "min_tokens"),
    (COMPLETIONS, b'{"prompt": "x", "suffix": "y"}', 400, "suffix"),
    (COMPLETIONS, b'{"prompt": "x", "best_of": 3}', 400, "best_of"),
    (COMPLETIONS, b'{"prompt": "x", "model": "gpt-4"}', 404, "gpt-4"),
    (COMPLETIONS, b'{"prompt": "x", "stream_options": 5}', 400, "stream_options"),
    (CHAT, b'{"messages": []}', 400, "messages"),
    (CHAT, b'{"messages": "hi"}', 400, "messages"),
    (CHAT, b'{"messages": [{"content": "hi"}]}', 400, "role"),
    (CHAT, b'{"messages": [{"role": "wizard", "content": "hi"}]}', 400, "role"),
    (CHAT, b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', 400, "text"),
    (CHAT, b'{"messages": [{"role": "user", "content": 5}]}', 400, "content"),
    (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "logprobs": true, "top_logprobs": 50}', 400,
     "top_logprobs"),
    (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}', 400, "logprobs"),
    (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}', 400,
     "max_completion_tokens"),
    (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema"}}', 400,
     "response_format"),
    (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"}', 400, "tool_choice"),
    (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"messages": 1}}', 400,
     "chat_template_kwargs"),
    ("/tokenize", b'{"prompt": "a", "messages": []}', 400, "one of"),
    ("/detokenize", b'{"tokens": [123456789]}', 400, "vocabulary"),
]


@pytest.mark.parametrize("path, body, status, needle", CASES, ids=[f"{i}" for i in range(len(CASES))])
def test_malformed_requests_are_clear_errors(server, path, body, status, needle) -> None:
    r = httpx.post(server.url + path, content=body, timeout=60)
    err = check_error(r, status)
    assert needle.lower() in err["message"].lower(), err


def test_fields_are_named_in_the_message_and_param(server) -> None:
    err = check_error(httpx.post(server.url + CHAT, json={"messages": [{"role": "user"}, {"content": "x"}]}), 400)
    assert err["param"] == "messages.1.role" and err["type"] == "invalid_request_error"


def test_prompt_over_the_context_says_the_lengths(server) -> None:
    err = check_error(httpx.post(server.url + COMPLETIONS, json={"prompt": list(range(5, 605))}), 400)
    assert "512" in err["message"] and "600" in err["message"] and err["code"] == "context_length_exceeded"
    err = check_error(httpx.post(server.url + COMPLETIONS, json={"prompt": [5] * 500, "max_tokens": 20}), 400)
    assert "520" in err["message"] and "500 in the prompt" in err["message"]
    huge = "word " * 400_000  # 2 MB under the body limit: tokenized off the event loop, then refused
    check_error(httpx.post(server.url + CHAT, json={"messages": [{"role": "user", "content": huge}]}, timeout=120), 400)


def test_unknown_fields_are_ignored_as_vllm_does(server) -> None:
    r = httpx.post(server.url + COMPLETIONS, json={"prompt": "x", "max_tokens": 2, "frobnicate": {"a": 1},
                                                   "service_tier": "flex"})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop")


def test_unknown_route_and_method(server) -> None:
    assert check_error(httpx.get(server.url + "/v1/nothing"), 404)["code"] == "not_found"
    assert check_error(httpx.get(server.url + COMPLETIONS), 405)["code"] == "method_not_allowed"
    assert check_error(httpx.get(server.url + "/v1/models/other"), 404)["code"] == "model_not_found"


def _json_values():
    scalars = st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=False,
                                                                                    allow_infinity=False) \
        | st.text(max_size=20) | st.just("x" * 100_000)
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8),
                                                                                             inner, max_size=3),
                        max_leaves=6)


SMALL_INT = st.integers(-3, 8)
FIELDS = {  # field -> values to draw: plausible ones mixed with anything JSON can hold
    "prompt": st.text(max_size=30) | st.lists(st.integers(-2, 500), max_size=8) | st.lists(st.text(max_size=5),
                                                                                           max_size=3),
    "max_tokens": SMALL_INT | st.none(), "n": st.integers(-1, 3), "temperature": st.floats(-1, 3),
    "top_p": st.floats(-0.5, 1.5), "top_k": SMALL_INT, "min_p": st.floats(-0.5, 1.5), "logprobs": SMALL_INT,
    "echo": st.booleans(), "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=3),
    "seed": st.integers(-2 ** 64, 2 ** 64), "presence_penalty": st.floats(-3, 3),
    "repetition_penalty": st.floats(-1, 3), "stream": st.booleans(), "ignore_eos": st.booleans(),
    "logit_bias": st.dictionaries(st.integers(-5, 500).map(str), st.floats(-150, 150), max_size=2),
    "stop_token_ids": st.lists(st.integers(-2, 500), max_size=3), "min_tokens": SMALL_INT,
    "top_logprobs": SMALL_INT, "max_completion_tokens": SMALL_INT,
}
KEYS = st.sampled_from(sorted(FIELDS) + ["messages", "model", "zzz_unknown"])


@st.composite
def fuzz_body(draw) -> tuple[str, dict]:
    path = draw(st.sampled_from([COMPLETIONS, CHAT]))
    body: dict = {"prompt": "def"} if path == COMPLETIONS else {"messages": MSG}
    for key in draw(st.lists(KEYS, max_size=5, unique=True)):
        wild = draw(st.booleans())
        if key == "messages":
            body[key] = draw(_json_values()) if wild else [{"role": draw(st.sampled_from(["user", "x"])),
                                                             "content": draw(st.text(max_size=20))}]
        elif key in FIELDS and not wild:
            body[key] = draw(FIELDS[key])
        else:
            body[key] = draw(_json_values())
    if isinstance(body.get("max_tokens"), int) and not body.get("echo"):
        body["max_tokens"] = min(body["max_tokens"], 8)  # bounded work per example
    body.setdefault("max_tokens", 4)
    return path, body


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=fuzz_body())
def test_fuzzed_requests_never_5xx_nor_hang(server, case) -> None:
    path, body = case
    with httpx.Client(timeout=60) as c:  # a hang fails as a timeout
        r = c.post(server.url + path, content=json.dumps(body))
        if r.status_code >= 400:
            check_error(r)
        elif body.get("stream") is True:
            assert r.text.rstrip().endswith("data: [DONE]"), r.text[-200:]
            assert '"error"' not in r.text
        else:
            assert r.json()["choices"], r.text


def test_fuzzing_left_nothing_running(server) -> None:
    wait_idle(server)


def test_api_key_guards_v1_only(tiny_dir) -> None:
    with running(make_app(tiny_dir, api_key="sk-test")) as url:
        body = {"prompt": "x", "max_tokens": 2}
        assert check_error(httpx.post(url + COMPLETIONS, json=body), 401)["code"] == "invalid_api_key"
        check_error(httpx.post(url + COMPLETIONS, json=body, headers={"Authorization": "Bearer nope"}), 401)
        check_error(httpx.get(url + "/v1/models"), 401)
        ok = httpx.post(url + COMPLETIONS, json=body, headers={"Authorization": "Bearer sk-test"})
        assert ok.status_code == 200
        assert httpx.get(url + "/health").status_code == 200  # outside /v1: open, as vLLM
        assert "ember:request_failure_total" in httpx.get(url + "/metrics").text


def test_body_size_limit(tiny_dir) -> None:
    with running(make_app(tiny_dir, max_body_bytes=4096)) as url:
        big = json.dumps({"prompt": "x" * 10_000}).encode()
        assert check_error(httpx.post(url + COMPLETIONS, content=big), 413)["code"] == "request_too_large"

        def chunked():  # no Content-Length: refused while it is read
            for i in range(0, len(big), 1000):
                yield big[i:i + 1000]

        check_error(httpx.post(url + COMPLETIONS, content=chunked()), 413)
        assert httpx.post(url + COMPLETIONS, json={"prompt": "x", "max_tokens": 1}).status_code == 200
