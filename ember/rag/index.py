"""A RAG index folder: its settings (index.json), its ingest manifest, its embedder and its store.

    with Index.open("runs/idx", create=True) as idx:            # LanceDB in runs/idx/lancedb
        ingest(idx, ["docs/"])
    with Index.open("runs/idx") as idx:
        hits = idx.retriever().search("how do I ...?", k=5)

Layout of DIR:
    index.json       format, embedder (name, dimension), chunk size and overlap, store spec
    manifest.json    source -> {hash, chunks}: what has been fully indexed (ingest.py)
    lancedb/         the LanceDB tables (default store)   | qdrant/ (Qdrant local mode)
With `--qdrant-url` the chunks live in the Qdrant server and DIR keeps index.json and the
manifest. Settings are fixed when the index is created; opening it with an embedder of another
dimension, or asking for other chunk settings, is an error naming the fix.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ember.atomic import atomic_write_json
from ember.jsonfile import read_json_object
from ember.rag.chunking import Chunker
from ember.rag.embed import DEFAULT_EMBEDDER, Embedder
from ember.rag.errors import RagError
from ember.rag.retrieve import Reranker, Retriever
from ember.rag.store import VectorStore, open_store

log = logging.getLogger(__name__)

FORMAT = "ember-rag/1"
INDEX_FILE = "index.json"
MANIFEST_FILE = "manifest.json"
DEFAULT_MAX_CHUNK = 512
DEFAULT_OVERLAP = 0.2
QDRANT_TERMS_PER_TOKEN = 0.4


@dataclass
class IndexSettings:
    """What an index was built with (index.json)."""

    embedder: str
    dim: int
    chunk_size: int
    chunk_overlap: int
    store: dict[str, Any] = field(default_factory=lambda: {"kind": "lancedb"})
    format: str = FORMAT


def _read_json(path: Path) -> dict:
    return read_json_object(path, RagError, "the index is damaged; rebuild it with `ember rag ingest`")


class Index:
    """An open index: settings, manifest, embedder and store. Use Index.open(...)."""

    def __init__(self, path: Path, settings: IndexSettings, embedder: Embedder, store: VectorStore) -> None:
        self.path, self.settings, self.embedder, self.store = path, settings, embedder, store
        manifest_path = path / MANIFEST_FILE
        self.manifest: dict[str, dict[str, Any]] = (
            _read_json(manifest_path).get("sources", {}) if manifest_path.is_file() else {})
        self.chunker = Chunker(embedder.token_offsets, settings.chunk_size, settings.chunk_overlap)

    @classmethod
    def open(cls, path: str | os.PathLike, *, create: bool = False, embedder: Embedder | str | None = None,
             chunk_size: int | None = None, chunk_overlap: int | None = None,
             store: dict[str, Any] | None = None) -> "Index":
        """Open the index in `path`; with create=True make it first if it does not exist."""
        path = Path(path).expanduser()
        settings_file = path / INDEX_FILE
        if settings_file.is_file():
            data = _read_json(settings_file)
            if data.get("format") != FORMAT:
                raise RagError(f"{path} is not an ember RAG index of format {FORMAT} (found {data.get('format')!r})")
            settings = IndexSettings(**{k: data[k] for k in IndexSettings.__dataclass_fields__ if k in data})
            for name, asked in (("chunk size", chunk_size), ("chunk overlap", chunk_overlap)):
                have = settings.chunk_size if name == "chunk size" else settings.chunk_overlap
                if asked is not None and asked != have:
                    raise RagError(f"index {path} was built with {name} {have}, not {asked}: drop the flag, "
                                   "or ingest into a new --index to change it")
            if store is not None and any(settings.store.get(k) != v for k, v in store.items()):
                raise RagError(f"index {path} uses the store {settings.store}, not {store}: drop the store flags "
                               "or use a new --index")
            emb = cls._embedder(embedder if embedder is not None else settings.embedder)
            if emb.dim != settings.dim:
                raise RagError(f"embedder {emb.name} makes {emb.dim}-dimensional vectors but index {path} holds "
                               f"{settings.dim}-dimensional ones (built with {settings.embedder}): use that embedder "
                               "or a new --index")
            if emb.name != settings.embedder:
                log.warning("index %s was built with embedder %s; searching it with %s (same dimension) only "
                            "makes sense if they are the same model", path, settings.embedder, emb.name)
        elif create:
            if path.exists() and not path.is_dir():
                raise RagError(f"--index {path} is a file: give a folder for the index")
            if path.is_dir() and any(path.iterdir()):
                raise RagError(f"{path} is not empty and holds no {INDEX_FILE}: give an empty or new folder for the index")
            emb = cls._embedder(embedder)
            size = chunk_size if chunk_size is not None else min(DEFAULT_MAX_CHUNK, emb.max_tokens)
            if size > emb.max_tokens:
                raise RagError(f"chunk size {size} exceeds what embedder {emb.name} reads ({emb.max_tokens} tokens): "
                               f"use --chunk-size {emb.max_tokens} or less")
            overlap = chunk_overlap if chunk_overlap is not None else round(size * DEFAULT_OVERLAP)
            Chunker(emb.token_offsets, size, overlap)  # validates size/overlap before anything is written
            spec = dict(store or {"kind": "lancedb"})
            if spec["kind"] == "qdrant":
                # Qdrant's BM25 weights documents with a fixed average length (lexical.py): about
                # 0.4 analyzer terms per chunk token (chunks run ~80% full, ~0.5 words per token).
                spec.setdefault("avgdl", round(QDRANT_TERMS_PER_TOKEN * size, 1))
            settings = IndexSettings(emb.name, emb.dim, size, overlap, spec)
            path.mkdir(parents=True, exist_ok=True)
            atomic_write_json(settings_file, asdict(settings))
        else:
            raise RagError(f"no RAG index at {path}: build one with `ember rag ingest PATHS --index {path}`")
        return cls(path, settings, emb, open_store(settings.store, path, settings.dim))

    @staticmethod
    def _embedder(embedder: Embedder | str | None) -> Embedder:
        return embedder if isinstance(embedder, Embedder) else Embedder(embedder or DEFAULT_EMBEDDER)

    def retriever(self, reranker: str | os.PathLike | Reranker | None = None) -> Retriever:
        if reranker is not None and not isinstance(reranker, Reranker):
            reranker = Reranker(reranker)
        return Retriever(self.store, self.embedder, reranker)

    def save_manifest(self) -> None:
        atomic_write_json(self.path / MANIFEST_FILE, {"format": FORMAT, "sources": self.manifest})

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the index for one writer; a second ingest into the same folder is refused."""
        with open(self.path / ".lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RagError(f"another ingest is writing to {self.path}: wait for it to finish") from None
            yield  # the lock goes with the file

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "Index":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
