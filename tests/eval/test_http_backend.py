"""The HTTP backend's protocol handling: discovery, retries, and one-line errors."""

from __future__ import annotations

import socket

import pytest

from ember.eval.backend import EvalBackendError, GenerationParams
from ember.eval.http_backend import OpenAIBackend, api_root
from tests.eval.openai_fake import make_app, serve

CHAT = [[{"role": "user", "content": "hi"}]]


def test_api_root_normalisation() -> None:
    for url in ("http://h:8000", "http://h:8000/", "http://h:8000/v1", "http://h:8000/v1/"):
        assert api_root(url) == "http://h:8000/v1"
    with pytest.raises(EvalBackendError, match="http://"):
        api_root("h:8000")


def test_model_name_and_context_come_from_v1_models(remote) -> None:
    fresh = OpenAIBackend(remote.root, tokenizer=remote.tokenizer)
    assert fresh.name == "fake-model"
    assert fresh.max_len == 512 - 2  # room for the echoed prompt plus the one generated token


def test_retries_transient_failures_then_succeeds() -> None:
    app = make_app(reply=lambda m: "fine", fail_first=2)
    with serve(app) as url:
        backend = OpenAIBackend(url, model="judge", max_retries=2)
        assert backend.generate(CHAT, GenerationParams(max_tokens=4)) == ["fine"]
    assert app.state.calls["requests"] == 3


def test_gives_up_with_the_servers_message() -> None:
    with serve(make_app(reply=lambda m: "fine", fail_first=5)) as url:
        backend = OpenAIBackend(url, model="judge", max_retries=1)
        with pytest.raises(EvalBackendError, match="HTTP 503: overloaded"):
            backend.generate(CHAT, GenerationParams())


def test_unreachable_server_is_one_clear_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but never listening: connections are refused
        backend = OpenAIBackend(f"http://127.0.0.1:{port}", model="m", max_retries=0)
        with pytest.raises(EvalBackendError, match="cannot reach .*is the server running"):
            backend.generate(CHAT, GenerationParams())


def test_likelihoods_need_the_tokenizer(server_url) -> None:
    backend = OpenAIBackend(server_url)
    with pytest.raises(EvalBackendError, match="--tokenizer"):
        backend.loglikelihood([("a", " b")])


def test_server_without_prompt_logprobs_is_named(tiny_dir, tokenizer) -> None:
    with serve(make_app(tiny_dir, echo=False)) as url:
        backend = OpenAIBackend(url, tokenizer=tokenizer)
        with pytest.raises(EvalBackendError, match="echo=true with logprobs"):
            backend.loglikelihood([("Question:", " yes")])


def test_text_prompts_without_tokenizer_still_generate(server_url, remote) -> None:
    params = GenerationParams(max_tokens=8)
    plain = OpenAIBackend(server_url, batch_size=2)  # no tokenizer: the server tokenises the text
    prompts = ["def f(x):", "import sys\n"]
    assert plain.generate(prompts, params) == remote.generate(prompts, params)
