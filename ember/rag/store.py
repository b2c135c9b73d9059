"""The vector store protocol: what ingest and retrieval need from LanceDB, Qdrant or anything else.

    store = open_store({"kind": "lancedb"}, index_dir, dim=384)         # embedded, the default
    store = open_store({"kind": "qdrant", "url": "http://host:6333"}, index_dir, dim=384)
    store.upsert(chunks, vectors)                    # by chunk id: writing the same chunk twice is a no-op
    store.delete("notes/a.md", keep={...ids})        # a source's chunks, except those still current
    hits = store.dense(query_vec, k=10, where={"source": ["notes/a.md"], "lang": "en"})
    hits = store.lexical("while loop", k=10)         # BM25
    store.count(), store.finish(), store.close()

A filter (`where`) maps a field to a value or a list of accepted values; all fields must match.
The field `source` matches the chunk's source; any other key matches the document metadata
(a jsonl record's extra fields, an HTML title), compared as strings.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Union

import numpy as np

from ember.rag.chunking import Chunk, metadata_json, metadata_tags
from ember.rag.errors import RagError

Filter = Mapping[str, Union[str, Sequence[str]]]


@dataclass
class Hit:
    """A retrieved chunk with the score of the retriever that found it (higher is better)."""

    chunk: Chunk
    score: float
    vector: np.ndarray | None = None


class VectorStore(Protocol):
    """Chunks with their unit vectors, searchable by vector (cosine) and by BM25."""

    dim: int

    def upsert(self, chunks: Sequence[Chunk], vectors: np.ndarray) -> None: ...

    def delete(self, source: str, keep: Collection[str] = ()) -> int:
        """Delete the chunks of `source` whose id is not in `keep`; returns how many went."""
        ...

    def ids(self, source: str) -> set[str]: ...

    def vectors(self, ids: Collection[str]) -> dict[str, np.ndarray]: ...

    def count(self, where: Filter | None = None) -> int: ...

    def dense(self, vector: np.ndarray, k: int, where: Filter | None = None,
              with_vectors: bool = False) -> list[Hit]:
        """Top-k by cosine similarity (the score)."""
        ...

    def lexical(self, query: str, k: int, where: Filter | None = None,
                with_vectors: bool = False) -> list[Hit]:
        """Top-k by BM25 over each chunk's heading line and text (the score)."""
        ...

    def finish(self) -> None:
        """Called after an ingest: build or refresh search indexes."""
        ...

    def close(self) -> None: ...


def normalize_filter(where: Filter | None) -> dict[str, list[str]]:
    """{field: [accepted values]} from a user filter, or a RagError saying what is wrong with it."""
    if not where:
        return {}
    if not isinstance(where, Mapping):
        raise RagError(f"a filter must map fields to values, got {type(where).__name__}")
    out: dict[str, list[str]] = {}
    for key, value in where.items():
        if not isinstance(key, str) or not key:
            raise RagError(f"filter field {key!r} must be a non-empty string")
        values = [value] if isinstance(value, (str, int, float, bool)) else value
        if not isinstance(values, (list, tuple)) or not values or not all(
                isinstance(v, (str, int, float, bool)) for v in values):
            raise RagError(f"filter field {key!r}: give a value or a non-empty list of values, got {value!r}")
        out[key] = [str(v) for v in values]
    return out


def parse_filters(specs: Sequence[str]) -> dict[str, list[str]]:
    """Filters from the command line: `key=value` items; repeating a key accepts any of its values."""
    out: dict[str, list[str]] = {}
    for spec in specs:
        key, sep, value = spec.partition("=")
        if not sep or not key.strip():
            raise RagError(f"filter {spec!r} is not key=value (e.g. --where source=notes/a.md lang=en)")
        out.setdefault(key.strip(), []).append(value)
    return out


def chunk_record(chunk: Chunk) -> dict[str, Any]:
    """The row (LanceDB) or payload (Qdrant) stored for a chunk, beside its vector."""
    return {"id": chunk.id, "source": chunk.source, "position": chunk.position, "start": chunk.start,
            "end": chunk.end, "headings": list(chunk.headings), "text": chunk.text, "context": chunk.context,
            "hash": chunk.hash, "metadata": metadata_json(chunk.metadata), "tags": metadata_tags(chunk.metadata)}


def chunk_from_record(r: Mapping[str, Any]) -> Chunk:
    """A Chunk from a stored row or payload (the columns both stores write)."""
    return Chunk(id=str(r["id"]), source=r["source"], position=int(r["position"]), start=int(r["start"]),
                 end=int(r["end"]), headings=tuple(r["headings"] or ()), text=r["text"], hash=r["hash"],
                 metadata=json.loads(r["metadata"]) if r.get("metadata") else {})


def open_store(spec: Mapping[str, Any], index_dir: str | os.PathLike, dim: int) -> VectorStore:
    """The store an index's `index.json` names: {"kind": "lancedb"} or {"kind": "qdrant", "url": ...}."""
    kind = spec.get("kind")
    if kind == "lancedb":
        from ember.rag.store_lancedb import LanceDBStore

        return LanceDBStore(Path(index_dir) / "lancedb", dim, **{k: v for k, v in spec.items() if k != "kind"})
    if kind == "qdrant":
        from ember.rag.store_qdrant import QdrantStore

        return QdrantStore(Path(index_dir) / "qdrant", dim, **{k: v for k, v in spec.items() if k != "kind"})
    raise RagError(f"unknown vector store {kind!r}: use lancedb or qdrant")
