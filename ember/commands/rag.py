"""Retrieval-augmented generation over your documents: ingest, search, ask, eval.

    ember rag ingest docs/ notes.md faq.jsonl --index runs/idx          # LanceDB in runs/idx
    ember rag ingest pydoc --index runs/pydoc-idx                       # the bundled Python docs
    ember rag ingest docs/ --index runs/idx --qdrant-url http://localhost:6333
    ember rag search "when does a while loop's else clause run?" --index runs/idx --k 5 --mode hybrid
    ember rag search "yield" --index runs/idx --where source=pydoc:yield --json
    ember rag ask "What does yield do?" --index runs/idx --model runs/quickstart/base
    ember rag eval --qa tests/rag/fixtures/pydoc_qa.jsonl --index runs/pydoc-idx

Re-running ingest only embeds what changed; --prune removes documents that are gone.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ember.checkpoint.registry import MODEL_HELP
from ember.rag.retrieve import MODES, Mode, SearchParams
from ember.rag.store import parse_filters


@dataclass
class IngestConfig:
    """Index files and folders (.txt .md .rst .py .html .pdf .jsonl, or 'pydoc') into an index folder."""

    paths: list[str] = field(metadata={"positional": True, "help": "files, folders, or 'pydoc'"})
    index: Path = field(metadata={"help": "index folder (created on first ingest)"})
    embedder: str | None = field(default=None, metadata={
        "help": "sentence-transformers model folder (default: the index's, or all-MiniLM-L6-v2 for a new one)"})
    chunk_size: int | None = field(default=None, metadata={
        "help": "chunk size in embedder tokens for a new index (default: min(512, the embedder's limit))"})
    chunk_overlap: int | None = field(default=None, metadata={"help": "overlap in tokens (default: 20%% of the size)"})
    qdrant_url: str | None = field(default=None, metadata={
        "help": "store chunks in this Qdrant server instead of LanceDB (new index only)"})
    qdrant_local: bool = field(default=False, metadata={"help": "store chunks with Qdrant's local mode in the index folder"})
    collection: str = field(default="ember_chunks", metadata={"help": "Qdrant collection name"})
    text_field: str = field(default="text", metadata={"help": "jsonl field holding the text"})
    prune: bool = field(default=False, metadata={"help": "remove indexed documents under PATHS that no longer exist"})
    batch_size: int = field(default=32, metadata={"help": "embedding batch size"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})


@dataclass
class SearchConfig:
    """Print the chunks that best match a query, with their source and score."""

    query: str = field(metadata={"positional": True, "help": "what to look for"})
    index: Path = field(metadata={"help": "index folder"})
    k: int = field(default=5, metadata={"help": "how many chunks"})
    mode: Mode = field(default="hybrid", metadata={"help": "dense (embeddings), bm25 (words) or hybrid (both, RRF)"})
    where: list[str] = field(default_factory=list, metadata={
        "help": "filters key=value (source=PATH or metadata fields; a repeated key accepts any of its values)"})
    candidates: int = field(default=50, metadata={"help": "candidates per retriever before fusion/rerank/MMR"})
    weights: list[float] = field(default_factory=lambda: [1.0, 1.0], metadata={"help": "hybrid weights: dense bm25"})
    mmr: float | None = field(default=None, metadata={"help": "MMR lambda in [0, 1] for diverse results"})
    min_similarity: float | None = field(default=None, metadata={"help": "drop chunks below this cosine similarity"})
    rerank: Path | None = field(default=None, metadata={"help": "cross-encoder model folder to rerank with"})
    json: bool = field(default=False, metadata={"help": "print a JSON list instead of text"})


@dataclass
class AskConfig:
    """Answer a question from the index with a model, citing the sources as [1], [2]."""

    question: str = field(metadata={"positional": True, "help": "the question"})
    index: Path = field(metadata={"help": "index folder"})
    model: Path = field(metadata={"help": MODEL_HELP})
    k: int = field(default=5, metadata={"help": "chunks to retrieve (as many as fit the context are used)"})
    mode: Mode = field(default="hybrid", metadata={"help": "dense, bm25 or hybrid"})
    where: list[str] = field(default_factory=list, metadata={"help": "filters key=value"})
    rerank: Path | None = field(default=None, metadata={"help": "cross-encoder model folder to rerank with"})
    max_tokens: int = field(default=256, metadata={"help": "answer budget in tokens"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy"})
    seed: int | None = field(default=None, metadata={"help": "random seed for sampling"})
    tokenizer: Path | None = field(default=None, metadata={"help": "tokenizer folder (default: the model folder)"})
    dtype: str = field(default="float32", metadata={"help": "float32, bfloat16 or float16"})
    kv_cache_memory: float = field(default=0.5, metadata={"help": "GiB for the serving engine's KV cache"})
    json: bool = field(default=False, metadata={"help": "print the answer and sources as JSON"})


@dataclass
class EvalConfig:
    """Retrieval quality per mode on a jsonl of {"question", "relevant": [sources or chunk ids]}."""

    qa: Path = field(metadata={"help": "jsonl file of questions with their relevant sources or chunk ids"})
    index: Path = field(metadata={"help": "index folder"})
    k: int = field(default=5, metadata={"help": "k of hit rate@k and recall@k"})
    modes: list[Mode] = field(default_factory=lambda: list(MODES), metadata={"help": "retriever modes to compare"})
    candidates: int = field(default=50, metadata={"help": "candidates per retriever before fusion"})
    json: bool = field(default=False, metadata={"help": "print the table as JSON"})


def _filters(specs: list[str]) -> dict[str, list[str]] | None:
    """--where items; a `source` that names an existing file is made absolute, as ingest stores it."""
    where = parse_filters(specs)
    if "source" in where:
        where["source"] = [str(Path(v).resolve()) if Path(v).exists() else v for v in where["source"]]
    return where or None


def ingest(cfg: IngestConfig) -> None:
    from ember.rag.embed import Embedder
    from ember.rag.index import Index
    from ember.rag.ingestion import ingest as run_ingest

    store = None
    if cfg.qdrant_url or cfg.qdrant_local:
        store = {"kind": "qdrant", "collection": cfg.collection}
        if cfg.qdrant_url:
            store["url"] = cfg.qdrant_url
    exists = (cfg.index / "index.json").is_file()
    embedder = Embedder(cfg.embedder, batch_size=cfg.batch_size) if cfg.embedder or not exists else None
    with Index.open(cfg.index, create=True, embedder=embedder, chunk_size=cfg.chunk_size,
                    chunk_overlap=cfg.chunk_overlap, store=store) as idx:
        idx.embedder.batch_size = cfg.batch_size
        report = run_ingest(idx, cfg.paths, text_field=cfg.text_field, prune=cfg.prune, progress=cfg.progress)
    print(f"{cfg.index}: {report.summary()}")


def _print_hits(hits: list, as_json: bool) -> None:
    if as_json:
        rows = [{"rank": i, "score": h.score, **h.chunk.to_dict()} for i, h in enumerate(hits, 1)]
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    for i, h in enumerate(hits, 1):
        c = h.chunk
        heading = f" — {' > '.join(c.headings)}" if c.headings else ""
        print(f"[{i}] {c.source}{heading}  (score {h.score:.4f}, chunk {c.position})")
        print("    " + c.text.strip().replace("\n", "\n    "))
        print()


def search(cfg: SearchConfig) -> None:
    from ember.rag.index import Index

    params = SearchParams(k=cfg.k, mode=cfg.mode, where=_filters(cfg.where), candidates=cfg.candidates,
                          weights=tuple(cfg.weights), mmr=cfg.mmr, min_similarity=cfg.min_similarity)
    with Index.open(cfg.index) as idx:
        hits = idx.retriever(cfg.rerank).search(cfg.query, params)
    if not hits and not cfg.json:
        print("no matching chunks", file=sys.stderr)
    _print_hits(hits, cfg.json)


def ask(cfg: AskConfig) -> None:
    from ember.engine.llm import LLM
    from ember.rag.answer import ask_index
    from ember.rag.index import Index

    llm = LLM(cfg.model, cfg.tokenizer, dtype=cfg.dtype, max_num_seqs=1, kv_cache_memory=cfg.kv_cache_memory)
    params = SearchParams(k=cfg.k, mode=cfg.mode, where=_filters(cfg.where))
    with Index.open(cfg.index) as idx:
        _, answer = ask_index(llm, idx.retriever(cfg.rerank), cfg.question, cfg.max_tokens, params=params,
                              temperature=cfg.temperature, seed=cfg.seed)
    if cfg.json:
        print(json.dumps(answer.to_dict(), indent=2, ensure_ascii=False))
        return
    print(answer.text)
    print("\nSources:")
    for s in answer.sources:
        mark = "*" if s.n in answer.cited else " "
        print(f"{mark}[{s.n}] {s.label()}  (score {s.score:.4f}{', truncated' if s.truncated else ''})")


def evaluate(cfg: EvalConfig) -> None:
    from ember.rag.evaluate import evaluate as run_eval
    from ember.rag.evaluate import format_table, load_qa
    from ember.rag.index import Index

    items = load_qa(cfg.qa)
    with Index.open(cfg.index) as idx:
        table = run_eval(idx.retriever(), items, k=cfg.k, modes=cfg.modes,
                         params=SearchParams(candidates=cfg.candidates))
    if cfg.json:
        print(json.dumps(table, indent=2))
    else:
        print(f"{len(items)} questions, {cfg.index}")
        print(format_table(table))


SUBCOMMANDS = {
    "ingest": (IngestConfig, ingest),
    "search": (SearchConfig, search),
    "ask": (AskConfig, ask),
    "eval": (EvalConfig, evaluate),
}


RAG_QUESTION = "When is the else clause of a while loop executed?"


def stage_real_rag(state) -> None:
    """Quickstart stage: `rag ask` with the real model over the index the rag stage built (no re-ingest)."""
    from ember.engine.llm import LLM
    from ember.rag.answer import ask_index
    from ember.rag.index import Index

    real = state.real_model()
    if real is None:
        return
    max_tokens = 32 if state.cfg.fast else 96
    llm = LLM(real.model, real.tokenizer, max_num_seqs=1, kv_cache_memory=0.25)
    with Index.open(state.cfg.out / "rag-index") as idx:
        grounded, answer = ask_index(llm, idx.retriever(), RAG_QUESTION, max_tokens)
    print(f"  Q: {RAG_QUESTION}")
    print(f"  A ({real.name}, {grounded.prompt_tokens}-token grounded prompt): {answer.text!r}")
    for s in answer.sources:
        mark = "*" if s.n in answer.cited else " "
        print(f"  {mark}[{s.n}] {s.label()}  (score {s.score:.4f}{', truncated to fit' if s.truncated else ''})")
    print(f"  (* = cited in the answer: {len(answer.cited)} of {len(answer.sources)} sources)")
