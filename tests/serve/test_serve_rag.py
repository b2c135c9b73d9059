"""`ember serve --rag-index`: chat answers grounded in an `ember rag` index, with their sources."""

from __future__ import annotations

import json

import httpx
import pytest

pytest.importorskip("sentence_transformers")
pytest.importorskip("lancedb")

from ember.serve import running  # noqa: E402
from tests.rag.conftest import build_tiny_embedder, write_corpus  # noqa: E402
from tests.serve.conftest import make_app  # noqa: E402

QUESTION = [{"role": "user", "content": "What does the cherry module keep?"}]


@pytest.fixture(scope="module")
def rag_url(tiny_dir, tmp_path_factory):
    from ember.rag import Embedder, Index, ingest

    root = tmp_path_factory.mktemp("rag")
    embedder = Embedder(build_tiny_embedder(root / "embedder"))
    with Index.open(root / "idx", create=True, embedder=embedder) as idx:
        ingest(idx, write_corpus(root / "docs", n=4))
    with running(make_app(tiny_dir, rag_index=root / "idx", rag_k=2, rag_mode="bm25", rag_max_tokens=8)) as url:
        yield url


def test_chat_is_grounded_and_lists_its_sources(rag_url) -> None:
    r = httpx.post(rag_url + "/v1/chat/completions", json={"messages": QUESTION, "temperature": 0}, timeout=60).json()
    sources = r["sources"]
    assert [s["n"] for s in sources] == [1, 2] and sources[0]["source"].endswith("cherry.md")
    assert r["usage"]["completion_tokens"] <= 8  # --rag-max-tokens when the request sets none
    plain = httpx.post(rag_url + "/v1/chat/completions", json={"messages": QUESTION, "rag": False,
                                                               "max_tokens": 2}).json()
    assert "sources" not in plain and plain["usage"]["prompt_tokens"] < r["usage"]["prompt_tokens"]


def test_streamed_grounded_chat_sends_sources_first(rag_url) -> None:
    body = {"messages": QUESTION, "stream": True, "max_tokens": 4}
    with httpx.stream("POST", rag_url + "/v1/chat/completions", json=body, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert events[0]["sources"][0]["source"].endswith("cherry.md")
    assert all("sources" not in e for e in events[1:])


def test_rag_without_an_index_is_a_clear_error(server) -> None:
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": QUESTION, "rag": True})
    assert r.status_code == 400 and "--rag-index" in r.json()["error"]["message"]
