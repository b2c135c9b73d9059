"""Ingest on both stores: idempotent re-ingest, edits touch only their file, pruning, interrupted and
killed ingests that resume to exactly the uninterrupted result, and the user errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import build_tiny_embedder, write_corpus
from ember.rag.embed import Embedder
from ember.rag.errors import RagError
from ember.rag.index import Index
from ember.rag.ingestion import ingest


def ids_by_source(idx: Index) -> dict[str, set[str]]:
    return {s: idx.store.ids(s) for s in idx.manifest}


def fresh_ids(docs: Path, tmp: Path, embedder: Embedder, spec: dict) -> dict[str, set[str]]:
    """What an uninterrupted ingest of `docs` into a new index holds."""
    with Index.open(tmp, create=True, embedder=embedder, store=spec) as idx:
        ingest(idx, [docs], progress=False)
        return ids_by_source(idx)


def test_default_chunk_settings_follow_the_embedder(tmp_path, tiny_embedder) -> None:
    with Index.open(tmp_path / "i", create=True, embedder=tiny_embedder) as idx:
        # min(512, what the embedder reads: 64 positions - [CLS] - [SEP]) with 20% overlap
        assert (idx.settings.chunk_size, idx.settings.chunk_overlap) == (62, 12)
        assert json.loads((tmp_path / "i" / "index.json").read_text())["dim"] == 32


def test_reingesting_the_same_folder_adds_nothing(store_spec, tiny_embedder, tmp_path) -> None:
    docs = tmp_path / "docs"
    write_corpus(docs)
    with Index.open(tmp_path / "idx", create=True, embedder=tiny_embedder, store=store_spec) as idx:
        first = ingest(idx, [docs], progress=False)
        assert first.new == 6 and first.total_chunks == first.chunks_written > 6
        before = ids_by_source(idx)
        again = ingest(idx, [docs], progress=False)
        assert (again.unchanged, again.chunks_written, again.chunks_embedded) == (6, 0, 0)
        assert again.total_chunks == first.total_chunks and ids_by_source(idx) == before
    with Index.open(tmp_path / "idx", embedder=tiny_embedder) as idx:  # also across processes' worth of state
        assert ingest(idx, [docs], progress=False).total_chunks == first.total_chunks


def test_editing_one_file_changes_only_its_chunks(store_spec, tiny_embedder, tmp_path) -> None:
    docs = tmp_path / "docs"
    paths = write_corpus(docs)
    with Index.open(tmp_path / "idx", create=True, embedder=tiny_embedder, store=store_spec) as idx:
        ingest(idx, [docs], progress=False)
        before = ids_by_source(idx)
        edited = paths[2]
        edited.write_text(edited.read_text() + "\n\nA new closing paragraph about kiwis and limes.\n")
        report = ingest(idx, [docs], progress=False)
        after = ids_by_source(idx)
    key = str(edited.resolve())
    assert report.changed == 1 and report.unchanged == 5
    assert {s: v for s, v in after.items() if s != key} == {s: v for s, v in before.items() if s != key}
    assert after[key] != before[key] and after[key] & before[key]  # the untouched head kept its ids
    assert report.chunks_embedded == len(after[key] - before[key]) < len(after[key])  # only new text embedded
    assert report.chunks_removed == len(before[key] - after[key])
    assert after == fresh_ids(docs, tmp_path / "fresh", tiny_embedder, store_spec)


def test_deleted_files_are_pruned_on_request(store_spec, tiny_embedder, tmp_path) -> None:
    docs = tmp_path / "docs"
    paths = write_corpus(docs)
    with Index.open(tmp_path / "idx", create=True, embedder=tiny_embedder, store=store_spec) as idx:
        total = ingest(idx, [docs], progress=False).total_chunks
        gone = str(paths[0].resolve())
        n_gone = len(idx.store.ids(gone))
        paths[0].unlink()
        kept = ingest(idx, [docs], progress=False)
        assert kept.gone == 1 and kept.pruned == 0 and kept.total_chunks == total
        pruned = ingest(idx, [docs], prune=True, progress=False)
        assert pruned.pruned == 1 and pruned.total_chunks == total - n_gone
        assert gone not in idx.manifest and idx.store.ids(gone) == set()
        assert pruned.chunks_removed == n_gone


class Boom(Exception):
    """Stands in for a crash at one exact point of an ingest."""


@pytest.mark.parametrize("fail_at", ["embed:2", "upsert:2", "delete:1"])
def test_an_interrupted_ingest_resumes_to_the_uninterrupted_result(store_spec, tiny_embedder, tmp_path,
                                                                   monkeypatch, fail_at) -> None:
    docs = tmp_path / "docs"
    paths = write_corpus(docs, n=8)
    with Index.open(tmp_path / "idx", create=True, embedder=tiny_embedder, store=store_spec) as idx:
        ingest(idx, [docs], progress=False, batch_chunks=16)
    for p in paths[::2]:  # edits, so the rerun also has stale chunks to delete
        p.write_text(p.read_text().replace("records", "ledgers"))
    expected = fresh_ids(docs, tmp_path / "fresh", tiny_embedder, store_spec)

    what, nth = fail_at.split(":")
    calls = {"n": 0}
    with Index.open(tmp_path / "idx", embedder=tiny_embedder) as idx:
        target = idx.embedder if what == "embed" else idx.store
        method = {"embed": "embed_documents", "upsert": "upsert", "delete": "delete"}[what]
        real = getattr(target, method)

        def flaky(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == int(nth):
                raise Boom(fail_at)
            return real(*args, **kwargs)

        monkeypatch.setattr(target, method, flaky)
        with pytest.raises(Boom):
            ingest(idx, [docs], progress=False, batch_chunks=16)
        monkeypatch.undo()
    with Index.open(tmp_path / "idx", embedder=tiny_embedder) as idx:
        report = ingest(idx, [docs], progress=False, batch_chunks=16)
        assert ids_by_source(idx) == expected
        assert report.total_chunks == sum(map(len, expected.values()))
        assert all(idx.manifest[s]["chunks"] == len(v) for s, v in expected.items())


@pytest.mark.slow
def test_a_killed_ingest_process_resumes_to_the_right_count(tiny_embedder_dir, tiny_embedder, tmp_path) -> None:
    docs = tmp_path / "docs"
    write_corpus(docs, n=120)  # ~1000 chunks: four batches of 256
    expected = fresh_ids(docs, tmp_path / "fresh", tiny_embedder, {"kind": "lancedb"})
    cmd = [sys.executable, "-m", "ember", "rag", "ingest", str(docs), "--index", str(tmp_path / "idx"),
           "--embedder", str(tiny_embedder_dir), "--batch-size", "4", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    manifest = tmp_path / "idx" / "manifest.json"
    deadline = time.time() + 300
    while not manifest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)  # mid-ingest: after the first batch is recorded
    proc.wait()
    done = json.loads(manifest.read_text())["sources"]
    assert 0 < len(done) < len(expected), "the ingest was not interrupted midway"
    with Index.open(tmp_path / "idx", embedder=tiny_embedder) as idx:  # the next run resumes
        report = ingest(idx, [docs], progress=False)
        assert report.unchanged == len(done) and report.new == len(expected) - len(done)
        assert ids_by_source(idx) == expected
        assert idx.store.count() == report.total_chunks == sum(map(len, expected.values()))


def test_user_errors_are_clear(tmp_path, tiny_embedder, tiny_embedder_dir) -> None:
    with pytest.raises(RagError, match="no RAG index at .*ember rag ingest"):
        Index.open(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with Index.open(tmp_path / "idx", create=True, embedder=tiny_embedder) as idx:
        with pytest.raises(RagError, match="nothing to index"):
            ingest(idx, [tmp_path / "empty"], progress=False)
        ingest(idx, write_corpus(tmp_path / "docs", n=1), progress=False)
    other = Embedder(build_tiny_embedder(tmp_path / "emb16", dim=16))
    with pytest.raises(RagError, match="makes 16-dimensional vectors but index .* holds 32-dimensional"):
        Index.open(tmp_path / "idx", embedder=other)
    with pytest.raises(RagError, match="chunk size 62, not 40"):
        Index.open(tmp_path / "idx", embedder=tiny_embedder, chunk_size=40)
    with pytest.raises(RagError, match="exceeds what embedder"):
        Index.open(tmp_path / "idx2", create=True, embedder=tiny_embedder, chunk_size=100)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(RagError, match="not empty"):
        Index.open(tmp_path / "busy", create=True, embedder=tiny_embedder)
    with Index.open(tmp_path / "idx", embedder=tiny_embedder) as a, a.writing():
        with Index.open(tmp_path / "idx", embedder=tiny_embedder) as b:
            with pytest.raises(RagError, match="another ingest"):
                ingest(b, [tmp_path / "docs"], progress=False)
