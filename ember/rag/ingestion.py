"""Incremental, idempotent, resumable ingest: documents -> chunks -> vectors -> store.

    with Index.open("runs/idx", create=True) as idx:
        report = ingest(idx, ["docs/", "faq.jsonl"], prune=True)

For each document (loaders.py) the manifest says whether it is already indexed with the same
content hash; if so nothing happens. Otherwise it is chunked, and its chunks are written in
batches. A chunk id derives from source + content hash, so a chunk that is already stored
(unchanged text in an edited file, or a batch written before an interrupted run) keeps its
vector instead of being embedded again. Once a batch is written, each of its documents loses the
chunks it no longer has and is recorded in the manifest (written atomically). The order makes
every stop safe:

    upsert batch  ->  delete each document's stale chunks  ->  manifest entry
    killed before the manifest entry: the next run redoes that document (upserts are no-ops,
    the stale delete happens then), so the index ends up exactly as after an uninterrupted run.

With prune=True, sources in the manifest under the given paths that no longer exist lose their
chunks; without it they are only counted in the report.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ember.rag.chunking import Chunk
from ember.rag.index import Index
from ember.rag.loaders import PYDOC, Document, load_documents

log = logging.getLogger(__name__)


@dataclass
class IngestReport:
    new: int = 0  # documents indexed for the first time
    changed: int = 0  # documents whose content changed
    unchanged: int = 0
    gone: int = 0  # sources under the given paths that no longer exist
    pruned: int = 0  # ... of which removed (prune=True)
    chunks_written: int = 0
    chunks_embedded: int = 0  # chunks whose vector had to be computed
    chunks_removed: int = 0
    total_chunks: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        gone = f", {self.pruned} pruned" if self.pruned else (
            f", {self.gone} gone (rerun with --prune to remove them)" if self.gone else "")
        return (f"{self.new} new, {self.changed} changed, {self.unchanged} unchanged document(s){gone}; "
                f"{self.chunks_written} chunks written ({self.chunks_embedded} embedded), "
                f"{self.chunks_removed} removed; {self.total_chunks} chunks in the index ({self.seconds:.1f}s)")


def _under(source: str, spec: str) -> bool:
    """Whether a manifest source was produced by the path spec (a folder, a file, or 'pydoc')."""
    if spec == PYDOC:
        return source.startswith(PYDOC + ":")
    if spec.startswith(PYDOC + ":"):
        return source == spec
    root = str(Path(spec).expanduser().resolve())
    return source == root or source.startswith((root + os.sep, root + ":", root + "#"))


class _Batch:
    """Documents whose chunks are waiting to be written together."""

    def __init__(self) -> None:
        self.docs: list[tuple[Document, list[Chunk]]] = []
        self.chunks: list[Chunk] = []

    def add(self, doc: Document, chunks: list[Chunk]) -> None:
        self.docs.append((doc, chunks))
        self.chunks.extend(chunks)


class _Progress:
    """A progress bar that appears with the first chunk written (not for no-op runs or early errors)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled, self.bar = enabled, None

    def update(self, n: int) -> None:
        if self.enabled and n:
            if self.bar is None:
                from tqdm.auto import tqdm

                self.bar = tqdm(desc="ingest", unit="chunk", dynamic_ncols=True)
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _flush(index: Index, batch: _Batch, report: IngestReport, bar: _Progress) -> None:
    if not batch.docs:
        return
    stored = index.store.vectors([c.id for c in batch.chunks])
    # Longest first, as sentence-transformers orders one big call: batches of similar length pad less.
    todo = sorted((c for c in batch.chunks if c.id not in stored), key=lambda c: -len(c.context))
    emb = index.embedder
    fresh: dict[str, np.ndarray] = {}
    for lo in range(0, len(todo), emb.batch_size):  # small steps keep the progress bar moving
        part = todo[lo:lo + emb.batch_size]
        fresh.update(zip((c.id for c in part), emb.embed_documents([c.context for c in part])))
        bar.update(len(part))
    bar.update(len(batch.chunks) - len(todo))
    vectors = np.stack([stored[c.id] if c.id in stored else fresh[c.id] for c in batch.chunks]) \
        if batch.chunks else np.zeros((0, emb.dim), np.float32)
    index.store.upsert(batch.chunks, vectors)
    for doc, chunks in batch.docs:
        report.chunks_removed += index.store.delete(doc.source, keep={c.id for c in chunks})
        index.manifest[doc.source] = {"hash": doc.hash, "chunks": len(chunks)}
    index.save_manifest()
    report.chunks_written += len(batch.chunks)
    report.chunks_embedded += len(todo)
    batch.__init__()


def _prune(index: Index, specs: list[str], seen: set[str], prune: bool, report: IngestReport) -> None:
    """Count (and with prune=True remove) manifest sources under `specs` that this run did not see."""
    gone = [s for s in index.manifest if s not in seen and any(_under(s, spec) for spec in specs)]
    report.gone = len(gone)
    if prune and gone:
        for source in gone:
            report.chunks_removed += index.store.delete(source)
            del index.manifest[source]
        index.save_manifest()
        report.pruned = len(gone)


def ingest(index: Index, paths: Iterable[str | os.PathLike], *, text_field: str = "text", prune: bool = False,
           batch_chunks: int = 256, progress: bool = True) -> IngestReport:
    """Bring the index up to date with `paths` (files, folders, 'pydoc'); see the module docstring."""
    start = time.perf_counter()
    specs = [str(p) for p in paths]
    report = IngestReport()
    seen: set[str] = set()
    batch = _Batch()
    bar = _Progress(progress)
    with index.writing():
        try:
            for doc in load_documents(specs, text_field):
                if doc.source in seen:
                    log.warning("skipping a second document with source %s (the first one is indexed)", doc.source)
                    continue
                seen.add(doc.source)
                entry = index.manifest.get(doc.source)
                if entry is not None and entry.get("hash") == doc.hash:
                    report.unchanged += 1
                    continue
                if entry is None:
                    report.new += 1
                else:
                    report.changed += 1
                batch.add(doc, index.chunker.split(doc))
                if len(batch.chunks) >= batch_chunks:
                    _flush(index, batch, report, bar)
            _flush(index, batch, report, bar)
            _prune(index, specs, seen, prune, report)
            index.store.finish()
        finally:
            bar.close()
    report.total_chunks = index.store.count()
    report.seconds = time.perf_counter() - start
    return report
