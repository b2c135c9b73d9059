"""RAG benchmark: ingest overhead over the bare embedder, and search latency at 10k / 100k chunks.

    python bench/rag.py                   # both parts (several minutes on 2 CPU cores)
    python bench/rag.py --part ingest --topics 30
    python bench/rag.py --part search --sizes 10000 100000 --queries 200

1. ingest: the same Python documentation topics are (a) chunked, then embedded by the bare
   sentence-transformers model (the baseline: the embedding work alone), and (b) ingested by
   `ember.rag.ingest` into a new index (loading, chunking, embedding, store writes, manifest,
   full-text/scalar indexes). Overhead = (b) / (a) - 1, for LanceDB and Qdrant local mode;
   each is timed `--repeats` times, alternating, and the best run is kept.
2. search: LanceDB tables of N chunks with random unit vectors (dim 384) and real text (pydoc
   chunks, each with a unique marker word), indexed as an ingest leaves them (IVF-Flat vector
   index from 5k chunks, full-text index for BM25). Timed per query: dense top-10 (store + fusion code path, query vector
   precomputed) and hybrid top-10 (dense + BM25 candidates of 50 each, RRF), against an exact
   numpy brute-force top-10 over the same vectors (the baseline: one matrix-vector product over
   the whole float32 matrix), timed alone over all queries first and then interleaved with
   ember's queries (baseline, dense, hybrid for each query in turn), with the ANN's recall@10
   against it; numpy's BLAS and threads are printed. Query embedding is timed separately
   (all-MiniLM-L6-v2, one query at a time).
Timings vary up to 2x on a shared machine; the load average is printed with the results.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ember.rag.embed import Embedder  # noqa: E402
from ember.rag.index import Index  # noqa: E402
from ember.rag.ingestion import ingest  # noqa: E402
from ember.rag.loaders import pydoc_documents  # noqa: E402
from ember.rag.retrieve import Retriever, SearchParams  # noqa: E402
from ember.rag.store import open_store  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1000, q))


def bench_ingest(emb: Embedder, topics: int, repeats: int, stores: list[str]) -> None:
    names = [d.source.removeprefix("pydoc:") for d in pydoc_documents()][:topics]
    docs = list(pydoc_documents(names))
    work = Path(tempfile.mkdtemp(prefix="ember-bench-rag-"))
    try:
        with Index.open(work / "probe", create=True, embedder=emb) as idx:
            texts = [c.context for d in docs for c in idx.chunker.split(d)]
        print(f"\n== ingest: {len(docs)} pydoc topics, {len(texts)} chunks, {sum(map(len, texts)) / 1e3:.0f}k chars"
              f" (chunk {idx.settings.chunk_size} tokens, overlap {idx.settings.chunk_overlap}) ==")
        bare: list[float] = []
        runs: dict[str, list[float]] = {s: [] for s in stores}
        for r in range(repeats):
            t0 = time.perf_counter()
            emb.embed_documents(texts)
            bare.append(time.perf_counter() - t0)
            for kind in stores:
                folder = work / f"{kind}-{r}"
                t0 = time.perf_counter()
                with Index.open(folder, create=True, embedder=emb, store={"kind": kind}) as idx:
                    report = ingest(idx, [f"pydoc:{n}" for n in names], progress=False)
                runs[kind].append(time.perf_counter() - t0)
                assert report.chunks_embedded == len(texts), report.summary()
        base = min(bare)
        print(f"{'path':<34}{'best s':>9}{'chunks/s':>10}{'overhead':>10}   all runs (s)")
        print(f"{'bare embedder (baseline)':<34}{base:>9.2f}{len(texts) / base:>10.1f}{'':>10}   "
              + " ".join(f"{t:.2f}" for t in bare))
        for kind, times in runs.items():
            best = min(times)
            print(f"{'ember ingest -> ' + kind:<34}{best:>9.2f}{len(texts) / best:>10.1f}{best / base - 1:>+10.1%}   "
                  + " ".join(f"{t:.2f}" for t in times))
    finally:
        shutil.rmtree(work, ignore_errors=True)


class _FixedQuery(Embedder):
    """Hands the retriever a precomputed query vector, so search timings exclude the embedding."""

    def __init__(self, dim: int) -> None:
        self.dim, self.vector = dim, np.zeros(dim, np.float32)

    def embed_query(self, text: str) -> np.ndarray:
        return self.vector


def exact_top10(vecs: np.ndarray, qv: np.ndarray) -> set[int]:
    """The baseline: exact top-10 by one matrix-vector product over the whole (n, dim) matrix."""
    scores = vecs @ qv
    top = np.argpartition(-scores, 10)[:10]
    return set(top[np.argsort(-scores[top])].tolist())


def blas_info() -> str:
    """numpy's BLAS and its threads, so a slow baseline can be told from a misconfigured one."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "numpy BLAS: unknown (threadpoolctl not installed)"
    pools = [f"{p.get('internal_api')} {p.get('version')} ({p.get('threading_layer', '?')}, "
             f"{p.get('num_threads')} threads, core {p.get('architecture')})"
             for p in threadpool_info() if p.get("user_api") == "blas"]
    return "numpy BLAS: " + ("; ".join(pools) or "none found")


def bench_search(emb: Embedder, sizes: list[int], n_queries: int) -> None:
    from ember.rag.chunking import Chunk, chunk_id
    from ember.rag.evaluate import load_qa

    dim = emb.dim
    base_docs = list(pydoc_documents())
    with Index.open(Path(tempfile.mkdtemp(prefix="ember-bench-probe-")), create=True, embedder=emb) as idx:
        base_chunks = [c for d in base_docs for c in idx.chunker.split(d)]
    questions = [q.question for q in load_qa(Path(__file__).resolve().parents[1] / "tests/rag/fixtures/pydoc_qa.jsonl")]
    import torch

    embed_ms = {}
    threads = torch.get_num_threads()
    for n_threads in sorted({threads, 1}, reverse=True):
        torch.set_num_threads(n_threads)
        emb.embed_query("warm-up")
        times = []
        for q in questions[:30]:
            t0 = time.perf_counter()
            emb.embed_query(q)
            times.append(time.perf_counter() - t0)
        embed_ms[n_threads] = (pct(times, 50), pct(times, 95))
    torch.set_num_threads(threads)
    print(f"\n== search: random unit vectors (dim {dim}) + pydoc chunk text; top-10; {n_queries} queries ==")
    print("query embedding alone (all-MiniLM-L6-v2, one query at a time), p50 / p95 ms: "
          + ", ".join(f"{t} torch thread(s) {a:.1f} / {b:.1f}" for t, (a, b) in embed_ms.items()))
    print(blas_info() + "; OPENBLAS_CORETYPE=" + os.environ.get("OPENBLAS_CORETYPE", "(unset)"))
    print(f"{'chunks':>8}  {'index':<9}{'search':<34}{'p50 ms':>8}{'p95 ms':>8}{'recall@10':>11}")
    rng = np.random.default_rng(0)
    for n in sizes:
        work = Path(tempfile.mkdtemp(prefix="ember-bench-search-"))
        try:
            vecs = rng.standard_normal((n, dim)).astype(np.float32)
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
            store = open_store({"kind": "lancedb"}, work, dim)
            t0 = time.perf_counter()
            for lo in range(0, n, 10_000):
                part = []
                for i in range(lo, min(n, lo + 10_000)):
                    c = base_chunks[i % len(base_chunks)]
                    text = f"{c.text}\nmarker{i}"
                    part.append(Chunk(chunk_id(f"bench:{i}", c.hash), f"bench:{i % 5000}", i, 0, len(text),
                                      c.headings, text, c.hash))
                store.upsert(part, vecs[lo:lo + len(part)])
            write_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            store.finish()
            index_s = time.perf_counter() - t0
            ann = "IVF-Flat" if n >= store.ann_min_rows else "flat"
            print(f"{n:>8}  written in {write_s:.1f}s, indexes (FTS, scalar{', ' + ann if ann != 'flat' else ''}) "
                  f"built in {index_s:.1f}s")
            # queries: perturbed stored vectors (a near neighbour exists), question text for BM25
            picks = rng.integers(0, n, n_queries)
            # float32 throughout: a float64 query (np.sqrt returns a float64 scalar, which numpy 2 does
            # not demote) makes every `vecs @ qv` copy the whole matrix to float64 first (~14x slower).
            noise = rng.standard_normal((n_queries, dim)).astype(np.float32) * np.float32(0.3 / np.sqrt(dim))
            qvecs = vecs[picks] + noise
            qvecs /= np.linalg.norm(qvecs, axis=1, keepdims=True)
            assert qvecs.dtype == np.float32, qvecs.dtype
            qtexts = [questions[i % len(questions)] for i in range(n_queries)]
            fixed = _FixedQuery(dim)
            retriever = Retriever(store, fixed)
            # The baseline alone first, then interleaved (same machine load for both sides).
            alone = []
            for qv in qvecs:
                t0 = time.perf_counter()
                exact_top10(vecs, qv)
                alone.append(time.perf_counter() - t0)
            brute, dense_t, hybrid_t, recall = [], [], [], []
            for qv, qt in zip(qvecs[:5], qtexts[:5]):  # warm-up: the first queries load the indexes
                fixed.vector = qv
                retriever.search(qt, SearchParams(k=10, mode="hybrid", candidates=50))
                exact_top10(vecs, qv)
            # Interleaved per query, so the baseline and ember see the same machine load.
            for qv, qt in zip(qvecs, qtexts):
                t0 = time.perf_counter()
                exact = exact_top10(vecs, qv)
                brute.append(time.perf_counter() - t0)
                fixed.vector = qv
                t0 = time.perf_counter()
                hits = retriever.search(qt, SearchParams(k=10, mode="dense"))
                dense_t.append(time.perf_counter() - t0)
                recall.append(len({h.chunk.position for h in hits} & exact) / 10)
                t0 = time.perf_counter()
                retriever.search(qt, SearchParams(k=10, mode="hybrid", candidates=50))
                hybrid_t.append(time.perf_counter() - t0)
            print(f"{n:>8}  {'exact':<9}{'numpy brute force, alone':<34}{pct(alone, 50):>8.2f}{pct(alone, 95):>8.2f}"
                  f"{1.0:>11.3f}")
            print(f"{n:>8}  {'exact':<9}{'numpy brute force, interleaved':<34}{pct(brute, 50):>8.2f}"
                  f"{pct(brute, 95):>8.2f}{1.0:>11.3f}")
            print(f"{n:>8}  {ann:<9}{'ember dense (LanceDB)':<34}{pct(dense_t, 50):>8.2f}{pct(dense_t, 95):>8.2f}"
                  f"{np.mean(recall):>11.3f}")
            print(f"{n:>8}  {ann:<9}{'ember hybrid (dense + BM25, RRF)':<34}{pct(hybrid_t, 50):>8.2f}"
                  f"{pct(hybrid_t, 95):>8.2f}{'':>11}")
            store.close()
        finally:
            shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["ingest", "search", "all"], default="all")
    ap.add_argument("--topics", type=int, default=20, help="pydoc topics to ingest (alphabetical)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--stores", nargs="+", default=["lancedb", "qdrant"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[10_000, 100_000])
    ap.add_argument("--queries", type=int, default=200)
    args = ap.parse_args()
    import torch

    print(f"CPU threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} "
          f"(over {os.cpu_count()} cores) at start")
    emb = Embedder()
    if args.part in ("ingest", "all"):
        bench_ingest(emb, args.topics, args.repeats, args.stores)
    if args.part in ("search", "all"):
        bench_search(emb, args.sizes, args.queries)
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
