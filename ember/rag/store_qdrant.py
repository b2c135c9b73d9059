"""Qdrant: the store for collections that outgrow one machine (a Qdrant cluster shards and replicates).

One collection (default `ember_chunks`) with two named vectors per point:
  - `dense`: the chunk's embedding, cosine distance (HNSW on a server);
  - `bm25`:  a sparse vector of BM25 term weights (lexical.py) with Qdrant's IDF modifier, so
             BM25 is computed by the server over the whole collection, however it is sharded.
The payload is the chunk's columns (store.chunk_record); `source` and `tags` get keyword indexes
for filters and deletes. Point ids are the chunk ids (UUIDs), so an upsert of the same chunk is a
no-op. With `url` it talks to a server (`--qdrant-url http://host:6333`, API key from
$QDRANT_API_KEY); without, it runs qdrant-client's local mode in the index folder — the same
client code, kept for tests and small indexes (it searches by brute force).
"""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ember.rag.chunking import Chunk
from ember.rag.errors import RagError, require
from ember.rag.lexical import BM25Encoder
from ember.rag.store import Filter, Hit, chunk_from_record, chunk_record, normalize_filter

BATCH = 256


class QdrantStore:
    """A VectorStore in a Qdrant collection (server or local mode)."""

    def __init__(self, path: Path, dim: int, url: str | None = None, collection: str = "ember_chunks",
                 avgdl: float = 150.0) -> None:
        qc = require("qdrant_client")
        self.models = require("qdrant_client.models")
        self.dim, self.collection, self.url = dim, collection, url
        try:
            self.client = (qc.QdrantClient(url=url, api_key=os.environ.get("QDRANT_API_KEY"), timeout=60) if url
                           else qc.QdrantClient(path=str(path)))
        except RuntimeError as e:  # local mode locks its folder against a second client
            raise RagError(f"cannot open the Qdrant store in {path}: {str(e).splitlines()[0]}") from None
        self.bm25 = BM25Encoder(avgdl=avgdl)
        self._ensure_collection()

    def _ensure_collection(self) -> None:
        m = self.models
        try:
            exists = self.client.collection_exists(self.collection)
        except Exception as e:  # connection refused, bad URL, auth: one line naming the server
            raise RagError(f"cannot reach Qdrant at {self.url}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                           " (start the server or fix --qdrant-url)") from None
        if exists:
            params = self.client.get_collection(self.collection).config.params
            size = params.vectors["dense"].size if isinstance(params.vectors, dict) else None
            if size != self.dim:
                raise RagError(f"Qdrant collection {self.collection!r} holds {size}-dimensional vectors but the "
                               f"embedder makes {self.dim}: use the embedder it was built with, or another collection")
            return
        self.client.create_collection(
            self.collection,
            vectors_config={"dense": m.VectorParams(size=self.dim, distance=m.Distance.COSINE)},
            sparse_vectors_config={"bm25": m.SparseVectorParams(modifier=m.Modifier.IDF)})
        if self.url:  # local mode has no payload indexes (and warns about them)
            for field in ("source", "tags"):
                self.client.create_payload_index(self.collection, field, m.PayloadSchemaType.KEYWORD)

    def _filter(self, where: Filter | None, source: str | None = None) -> Any:
        m = self.models
        must = [m.FieldCondition(key="source" if key == "source" else "tags",
                                 match=m.MatchAny(any=values if key == "source" else [f"{key}={v}" for v in values]))
                for key, values in normalize_filter(where).items()]
        if source is not None:
            must.append(m.FieldCondition(key="source", match=m.MatchValue(value=source)))
        return m.Filter(must=must) if must else None

    def upsert(self, chunks: Sequence[Chunk], vectors: np.ndarray) -> None:
        m = self.models
        if vectors.shape != (len(chunks), self.dim):
            raise ValueError(f"expected vectors of shape {(len(chunks), self.dim)}, got {vectors.shape}")
        for lo in range(0, len(chunks), BATCH):
            points = []
            for chunk, vec in zip(chunks[lo:lo + BATCH], vectors[lo:lo + BATCH]):
                indices, values = self.bm25.document(chunk.context)
                payload = chunk_record(chunk)
                del payload["context"]  # recomputed from headings + text when read back
                points.append(m.PointStruct(id=chunk.id, payload=payload, vector={
                    "dense": vec.tolist(), "bm25": m.SparseVector(indices=indices, values=values)}))
            self.client.upsert(self.collection, points, wait=True)

    def ids(self, source: str) -> set[str]:
        out: set[str] = set()
        offset = None
        while True:
            points, offset = self.client.scroll(self.collection, scroll_filter=self._filter(None, source),
                                                limit=1024, offset=offset, with_payload=False, with_vectors=False)
            out.update(str(p.id) for p in points)
            if offset is None:
                return out

    def delete(self, source: str, keep: Collection[str] = ()) -> int:
        stale = sorted(self.ids(source) - set(keep))
        if stale:
            self.client.delete(self.collection, points_selector=self.models.PointIdsList(points=stale), wait=True)
        return len(stale)

    def vectors(self, ids: Collection[str]) -> dict[str, np.ndarray]:
        if not ids:
            return {}
        points = self.client.retrieve(self.collection, ids=list(ids), with_payload=False, with_vectors=["dense"])
        return {str(p.id): np.asarray(p.vector["dense"], dtype=np.float32) for p in points}

    def count(self, where: Filter | None = None) -> int:
        return self.client.count(self.collection, count_filter=self._filter(where), exact=True).count

    def _search(self, query: Any, using: str, k: int, where: Filter | None, with_vectors: bool) -> list[Hit]:
        result = self.client.query_points(self.collection, query=query, using=using, limit=k,
                                          query_filter=self._filter(where), with_payload=True,
                                          with_vectors=["dense"] if with_vectors else False)
        return [Hit(chunk_from_record(p.payload), float(p.score),
                    np.asarray(p.vector["dense"], dtype=np.float32) if with_vectors else None)
                for p in result.points]

    def dense(self, vector: np.ndarray, k: int, where: Filter | None = None,
              with_vectors: bool = False) -> list[Hit]:
        return self._search(np.asarray(vector, dtype=np.float32).tolist(), "dense", k, where, with_vectors)

    def lexical(self, query: str, k: int, where: Filter | None = None,
                with_vectors: bool = False) -> list[Hit]:
        indices, values = self.bm25.query(query)
        if not indices:
            return []
        return self._search(self.models.SparseVector(indices=indices, values=values), "bm25", k, where,
                            with_vectors)

    def finish(self) -> None:
        """Nothing to do: Qdrant indexes points as they are written."""

    def close(self) -> None:
        self.client.close()
