"""Retrieval: dense, BM25 or hybrid (reciprocal rank fusion), then filters, threshold, rerank and MMR.

    r = Retriever(store, embedder)
    hits = r.search("how do generators work?", k=5)                       # hybrid
    hits = r.search(q, k=5, mode="dense", where={"source": "pydoc:yield"})
    hits = r.search(q, k=5, mmr=0.5, min_similarity=0.3)
    hits = Retriever(store, embedder, reranker=Reranker("path/to/cross-encoder")).search(q)

One query runs in this order:
  1. candidates: the top `candidates` chunks by cosine similarity and/or by BM25, with the
     metadata filter applied inside the store (before ranking, so k results still come back);
     in hybrid mode BM25 runs concurrently with embedding the query and the dense search;
  2. hybrid: reciprocal rank fusion, score = sum_m w_m / (rrf_k + rank_m), rank from 1, rrf_k = 60
     (Cormack et al. 2009); a chunk only one retriever found gets only that term;
  3. `min_similarity`: drop chunks whose cosine similarity to the query is below it (in every
     mode, so one threshold means the same thing whichever retriever ranked the chunk);
  4. rerank: a cross-encoder scores (query, chunk) pairs and its score orders them;
  5. MMR (`mmr` = lambda in [0, 1]): pick k greedily by lambda * relevance - (1 - lambda) * the
     highest cosine similarity to a chunk already picked; relevance is the step-2/4 score
     min-max scaled to [0, 1]. 1 keeps the ranking, lower values trade relevance for diversity.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np

from ember.rag.embed import Embedder, quiet_loading
from ember.rag.errors import RagError, require
from ember.rag.store import Filter, Hit, VectorStore

Mode = Literal["dense", "bm25", "hybrid"]
MODES: tuple[Mode, ...] = ("dense", "bm25", "hybrid")
RRF_K = 60


@dataclass(frozen=True)
class SearchParams:
    """How one search runs; see the module docstring for each step."""

    k: int = 5
    mode: Mode = "hybrid"
    where: Filter | None = None
    candidates: int = 50  # per retriever, before fusion / rerank / MMR
    weights: tuple[float, float] = (1.0, 1.0)  # dense, bm25 (hybrid only)
    rrf_k: int = RRF_K
    min_similarity: float | None = None
    mmr: float | None = None

    def check(self) -> None:
        if self.k < 1 or self.candidates < 1:
            raise RagError(f"k ({self.k}) and candidates ({self.candidates}) must be at least 1")
        if self.mode not in MODES:
            raise RagError(f"unknown retrieval mode {self.mode!r}: use one of {', '.join(MODES)}")
        if len(self.weights) != 2 or min(self.weights) < 0 or max(self.weights) <= 0:
            raise RagError(f"hybrid weights {self.weights} must be two non-negative numbers (dense, bm25), not both 0")
        if self.mmr is not None and not 0 <= self.mmr <= 1:
            raise RagError(f"mmr lambda {self.mmr} must be between 0 and 1")
        if self.rrf_k < 0:
            raise RagError(f"rrf_k {self.rrf_k} must be non-negative")


class Reranker:
    """A sentence-transformers cross-encoder from a local folder: scores (query, passage) pairs."""

    def __init__(self, path: str | os.PathLike, batch_size: int = 32, device: str = "cpu") -> None:
        st = require("sentence_transformers")
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise RagError(f"reranker {folder} is not a folder: give a local cross-encoder model folder")
        with quiet_loading():
            self.model = st.CrossEncoder(str(folder), device=device, local_files_only=True)
        self.batch_size = batch_size

    def scores(self, query: str, passages: Sequence[str]) -> np.ndarray:
        if not passages:
            return np.zeros(0, dtype=np.float32)
        out = self.model.predict([(query, p) for p in passages], batch_size=self.batch_size,
                                 convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(out, dtype=np.float32).reshape(len(passages))


def rrf(rankings: Sequence[Sequence[Hit]], weights: Sequence[float], k: int = RRF_K) -> list[Hit]:
    """Reciprocal rank fusion of ranked hit lists (by chunk id); the fused score replaces each score."""
    fused: dict[str, float] = {}
    first: dict[str, Hit] = {}
    for hits, w in zip(rankings, weights):
        for rank, hit in enumerate(hits, 1):
            fused[hit.chunk.id] = fused.get(hit.chunk.id, 0.0) + w / (k + rank)
            if hit.chunk.id not in first or (first[hit.chunk.id].vector is None and hit.vector is not None):
                first[hit.chunk.id] = hit
    order = sorted(fused, key=lambda cid: -fused[cid])
    return [replace(first[cid], score=fused[cid]) for cid in order]


def mmr_select(hits: Sequence[Hit], k: int, lam: float) -> list[Hit]:
    """Maximal marginal relevance over hits that carry vectors (see the module docstring)."""
    if not hits:
        return []
    scores = np.array([h.score for h in hits], dtype=np.float64)
    span = scores.max() - scores.min()
    relevance = (scores - scores.min()) / span if span > 0 else np.ones_like(scores)
    vecs = np.stack([h.vector for h in hits])
    sims = vecs @ vecs.T
    chosen: list[int] = []
    left = list(range(len(hits)))
    while left and len(chosen) < k:
        def value(i: int) -> float:
            redundancy = max((sims[i, j] for j in chosen), default=0.0)
            return lam * relevance[i] - (1 - lam) * redundancy
        best = max(left, key=value)
        chosen.append(best)
        left.remove(best)
    return [hits[i] for i in chosen]


class Retriever:
    """Searches one store with one embedder (and optionally a cross-encoder)."""

    def __init__(self, store: VectorStore, embedder: Embedder, reranker: Reranker | None = None) -> None:
        self.store, self.embedder, self.reranker = store, embedder, reranker
        self._pool: ThreadPoolExecutor | None = None

    def _with_vectors(self, hits: list[Hit]) -> list[Hit]:
        missing = [h.chunk.id for h in hits if h.vector is None]
        found = self.store.vectors(missing) if missing else {}
        return [h if h.vector is not None else replace(h, vector=found[h.chunk.id]) for h in hits]

    def search(self, query: str, params: SearchParams | None = None, **overrides) -> list[Hit]:
        """The top-k chunks for `query` (see SearchParams; keyword overrides change single fields)."""
        p = replace(params or SearchParams(), **overrides)
        p.check()
        if not query.strip():
            raise RagError("the query is empty: ask something")
        post = p.min_similarity is not None or p.mmr is not None or self.reranker is not None
        n = max(p.candidates, p.k) if (p.mode == "hybrid" or post) else p.k
        need_vecs = p.min_similarity is not None or p.mmr is not None
        lexical_future = None
        if p.mode == "hybrid":  # BM25 runs while the query is embedded and searched (outside the GIL)
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ember-rag-bm25")
            lexical_future = self._pool.submit(self.store.lexical, query, n, p.where, need_vecs)
        qvec = self.embedder.embed_query(query) if (p.mode != "bm25" or need_vecs) else None
        if lexical_future is not None:
            dense = self.store.dense(qvec, n, p.where, with_vectors=need_vecs)
            hits = rrf([dense, lexical_future.result()], p.weights, p.rrf_k)
        elif p.mode == "dense":
            hits = self.store.dense(qvec, n, p.where, with_vectors=need_vecs)
        else:
            hits = self.store.lexical(query, n, p.where, with_vectors=need_vecs)
        if need_vecs:
            hits = self._with_vectors(hits)
        if p.min_similarity is not None:
            hits = [h for h in hits if float(h.vector @ qvec) >= p.min_similarity]
        if self.reranker is not None:
            scores = self.reranker.scores(query, [h.chunk.context for h in hits])
            hits = [replace(h, score=float(s)) for h, s in zip(hits, scores)]
            hits.sort(key=lambda h: -h.score)
        if p.mmr is not None:
            hits = mmr_select(hits, p.k, p.mmr)
        return hits[:p.k]
