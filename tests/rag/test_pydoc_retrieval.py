"""Acceptance: on the bundled Python documentation, indexed with the default all-MiniLM-L6-v2 and
default chunking, hybrid retrieval reaches recall@5 >= 0.9 on the 68-question set and beats
dense-only and BM25-only on MRR, on both stores. The chunks are embedded once per session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import STORES
from ember.rag.embed import Embedder
from ember.rag.evaluate import evaluate, format_table, load_qa
from ember.rag.index import Index
from ember.rag.ingestion import ingest

FIXTURE = Path(__file__).parent / "fixtures" / "pydoc_qa.jsonl"


class CachedEmbedder(Embedder):
    """The real embedder, remembering vectors by text so the second store costs no embedding."""

    def __init__(self, inner: Embedder) -> None:
        self.__dict__.update(inner.__dict__)
        self._memo: dict[tuple[str, str], np.ndarray] = {}

    def embed_documents(self, texts, progress=False):
        todo = [t for t in dict.fromkeys(texts) if ("d", t) not in self._memo]
        self._memo.update(zip((("d", t) for t in todo), super().embed_documents(todo, progress)))
        return np.stack([self._memo["d", t] for t in texts]) if texts else super().embed_documents([])

    def embed_query(self, text):
        if ("q", text) not in self._memo:
            self._memo["q", text] = super().embed_query(text)
        return self._memo["q", text]


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Overrides conftest's: MiniLM's batches are big enough to use every core."""
    yield


@pytest.fixture(scope="module")
def cached(minilm) -> CachedEmbedder:
    return CachedEmbedder(minilm)


@pytest.mark.slow
@pytest.mark.parametrize("kind", STORES)
def test_hybrid_beats_dense_and_bm25_on_the_python_docs(kind, cached, tmp_path) -> None:
    with Index.open(tmp_path / "idx", create=True, embedder=cached, store={"kind": kind}) as idx:
        assert (idx.settings.chunk_size, idx.settings.chunk_overlap) == (254, 51)  # min(512, 256 - 2), 20%
        report = ingest(idx, ["pydoc"], progress=False)
        assert report.total_chunks > 500
        table = evaluate(idx.retriever(), load_qa(FIXTURE), k=5)
    print(f"\n{kind}: {report.total_chunks} chunks\n{format_table(table)}")
    assert table["hybrid"]["recall@5"] >= 0.9
    assert table["hybrid"]["mrr"] > table["dense"]["mrr"]
    assert table["hybrid"]["mrr"] > table["bm25"]["mrr"]
