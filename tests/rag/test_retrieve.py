"""Retrieval on both stores: RRF fusion and weights, filters before ranking, the similarity threshold,
MMR, and cross-encoder reranking checked against sentence-transformers' CrossEncoder directly."""

from __future__ import annotations

import numpy as np
import pytest

from ember.rag.chunking import Chunk
from ember.rag.errors import RagError
from ember.rag.index import Index
from ember.rag.ingestion import ingest
from ember.rag.retrieve import Reranker, mmr_select, rrf
from ember.rag.store import Hit

TEXTS = {
    "walrus.txt": "The walrus operator assigns inside an expression.",
    "lambda.txt": "A lambda makes a small anonymous function.",
    "yield.txt": "A yield turns the function into a generator.",
    "slice.txt": "Slicing picks a range of items with start stop and step.",
    "walrus-copy.txt": "The walrus operator assigns inside an expression.",
    "zebra.txt": "Zebras graze on the savanna in herds.",
    "tuple.txt": "A tuple is an immutable sequence of values.",
}


@pytest.fixture
def index(store_spec, tiny_embedder, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for name, text in TEXTS.items():
        (docs / name).write_text(text + "\n")
    with Index.open(tmp_path / "idx", create=True, embedder=tiny_embedder, store=store_spec) as idx:
        ingest(idx, [docs], progress=False)
        yield idx


def name(hit: Hit) -> str:
    return hit.chunk.source.rsplit("/", 1)[-1]


def test_rrf_is_the_weighted_reciprocal_rank_sum() -> None:
    def hits(*ids: str) -> list[Hit]:
        return [Hit(Chunk(i, i, 0, 0, 1, (), i, i), 0.0) for i in ids]

    fused = rrf([hits("a", "b", "c"), hits("c", "d")], weights=(1.0, 2.0), k=60)
    scores = {h.chunk.id: h.score for h in fused}
    assert scores == pytest.approx({"a": 1 / 61, "b": 1 / 62, "c": 1 / 63 + 2 / 61, "d": 2 / 62})
    assert [h.chunk.id for h in fused] == ["c", "d", "a", "b"]


def test_hybrid_fuses_both_and_weights_select_one(index) -> None:
    r = index.retriever()
    query = "The walrus operator assigns inside an expression."
    dense = r.search(query, k=7, mode="dense")
    bm25 = r.search(query, k=7, mode="bm25")
    assert {name(h) for h in dense[:2]} == {"walrus.txt", "walrus-copy.txt"}
    assert dense[0].score == pytest.approx(1.0, abs=1e-5)  # the same text embeds to the same vector
    hybrid = r.search(query, k=7)
    assert {name(h) for h in hybrid} == {name(h) for h in dense} | {name(h) for h in bm25}
    assert [h.chunk.id for h in r.search(query, k=7, weights=(1.0, 0.0))][:len(dense)] == [h.chunk.id for h in dense]
    only_bm25 = r.search(query, k=7, weights=(0.0, 1.0))
    assert [h.chunk.id for h in only_bm25][:len(bm25)] == [h.chunk.id for h in bm25]


def test_filters_apply_before_ranking(index) -> None:
    r = index.retriever()
    target = str(index.path.parent / "docs" / "zebra.txt")
    for mode in ("dense", "bm25", "hybrid"):
        hits = r.search("walrus operator", k=3, mode=mode, where={"source": target})
        assert [h.chunk.source for h in hits] == ([target] if mode != "bm25" else [])  # bm25: no shared word


def test_min_similarity_means_cosine_in_every_mode(index) -> None:
    r = index.retriever()
    query = "A tuple is an immutable sequence of values."
    for mode in ("dense", "bm25", "hybrid"):
        hits = r.search(query, k=5, mode=mode, min_similarity=0.9999)
        assert [name(h) for h in hits] == ["tuple.txt"], mode
    everything = r.search(query, k=7, mode="dense")
    i = next(i for i in range(2, 6) if everything[i].score - everything[i + 1].score > 1e-4)
    cut = (everything[i].score + everything[i + 1].score) / 2  # between two distinct scores, not at a tie
    kept = r.search(query, k=7, mode="dense", min_similarity=cut)
    assert [h.chunk.id for h in kept] == [h.chunk.id for h in everything[:i + 1]]


def test_mmr_trades_relevance_for_diversity(index) -> None:
    r = index.retriever()
    query = "The walrus operator assigns inside an expression."
    plain = r.search(query, k=4, mode="dense")
    assert [h.chunk.id for h in r.search(query, k=4, mode="dense", mmr=1.0)] == [h.chunk.id for h in plain]
    diverse = r.search(query, k=4, mode="dense", mmr=0.0)
    assert name(diverse[0]) in ("walrus.txt", "walrus-copy.txt")
    assert "walrus" not in name(diverse[1])  # the exact duplicate adds nothing new


def test_mmr_formula_on_designed_vectors() -> None:
    def hit(i: str, score: float, vec: list[float]) -> Hit:
        v = np.asarray(vec, dtype=np.float32)
        return Hit(Chunk(i, i, 0, 0, 1, (), i, i), score, v / np.linalg.norm(v))

    hits = [hit("a", 1.0, [1, 0, 0]), hit("a2", 0.9, [1, 0.05, 0]), hit("b", 0.5, [0, 1, 0]), hit("c", 0.0, [0, 0, 1])]
    assert [h.chunk.id for h in mmr_select(hits, 3, 1.0)] == ["a", "a2", "b"]
    # relevance scaled to [0, 1]: a2 = 0.9, b = 0.5, c = 0; at lambda 0.5: a2 -> 0.45 - 0.5 * 0.999,
    # b -> 0.25 - 0, c -> 0 - 0: b, then c (0 - 0.5 * 0) beats a2 (0.45 - 0.5 * 0.999)
    assert [h.chunk.id for h in mmr_select(hits, 3, 0.5)] == ["a", "b", "c"]


def test_rerank_orders_by_the_cross_encoder(index, tiny_cross_encoder_dir) -> None:
    from sentence_transformers import CrossEncoder

    query = "what makes a generator"
    candidates = index.retriever().search(query, k=7, mode="hybrid")
    hits = index.retriever(tiny_cross_encoder_dir).search(query, k=3, mode="hybrid")
    reference = CrossEncoder(str(tiny_cross_encoder_dir), device="cpu")
    scores = reference.predict([(query, h.chunk.context) for h in candidates])
    order = np.argsort(-np.asarray(scores))[:3]
    assert [h.chunk.id for h in hits] == [candidates[i].chunk.id for i in order]
    np.testing.assert_allclose([h.score for h in hits], np.asarray(scores)[order], rtol=1e-5)


@pytest.mark.parametrize("bad, match", [
    ({"k": 0}, "at least 1"), ({"mode": "fuzzy"}, "unknown retrieval mode"),
    ({"weights": (0.0, 0.0)}, "weights"), ({"mmr": 1.5}, "between 0 and 1"),
])
def test_bad_search_parameters_are_errors(index, bad, match) -> None:
    with pytest.raises(RagError, match=match):
        index.retriever().search("x", **bad)
    with pytest.raises(RagError, match="empty"):
        index.retriever().search("   ")


def test_reranker_path_must_exist(tmp_path) -> None:
    with pytest.raises(RagError, match="not a folder"):
        Reranker(tmp_path / "none")

