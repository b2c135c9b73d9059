"""Retrieval evaluation: hit rate@k, recall@k, MRR and nDCG@10 per retriever mode, in one table.

    items = load_qa("tests/rag/fixtures/pydoc_qa.jsonl")      # {"question": ..., "relevant": [...]}
    table = evaluate(retriever, items, k=5)                    # {"hybrid": {"recall@5": ...}, ...}
    print(format_table(table, k=5))

`relevant` lists sources (`pydoc:while`, a file path) or chunk ids; a retrieved chunk matches
an entry when its id or its source equals it. Metrics are over the top 10 chunks of each
query, as a user sees them: an entry counts once, at the first chunk that matches it (a second
chunk of an already-found source adds nothing). With R the relevant entries of a query:
    hit@k     1 if any entry is matched in the top k
    recall@k  entries matched in the top k / |R|
    MRR       1 / rank of the first matching chunk (0 if none in the top 10)
    nDCG@10   sum of 1/log2(rank+1) over first matches, over the same sum for an ideal ranking
Each is averaged over the queries.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ember.data.sources import jsonl_records
from ember.rag.errors import RagError
from ember.rag.retrieve import MODES, Retriever, SearchParams
from ember.rag.store import Hit

DEPTH = 10  # chunks retrieved per query for MRR and nDCG


@dataclass(frozen=True)
class QAItem:
    question: str
    relevant: tuple[str, ...]


def load_qa(path: str | Path) -> list[QAItem]:
    """Questions with their relevant sources or chunk ids, from a jsonl file."""
    path = Path(path)
    if not path.is_file():
        raise RagError(f"QA file {path} does not exist: give a jsonl of "
                       '{"question": ..., "relevant": [sources or chunk ids]}')
    items = []
    for lineno, rec in jsonl_records(path):
        rel = rec.get("relevant")
        if isinstance(rel, str):
            rel = [rel]
        if not isinstance(rec.get("question"), str) or not rel or not all(
                isinstance(r, str) for r in rel):
            raise RagError(f"{path}:{lineno}: expected {{\"question\": str, \"relevant\": [str, ...]}}")
        items.append(QAItem(rec["question"], tuple(rel)))
    if not items:
        raise RagError(f"QA file {path} has no questions")
    return items


def first_matches(hits: Sequence[Hit], relevant: Sequence[str]) -> list[int]:
    """1-based ranks at which a relevant entry is first matched (one rank per entry found)."""
    found: dict[str, int] = {}
    for rank, hit in enumerate(hits, 1):
        for entry in relevant:
            if entry not in found and entry in (hit.chunk.id, hit.chunk.source):
                found[entry] = rank
    return sorted(found.values())


def query_metrics(hits: Sequence[Hit], relevant: Sequence[str], k: int) -> dict[str, float]:
    ranks = first_matches(hits[:DEPTH], relevant)
    n_rel = len(set(relevant))
    ideal = sum(1 / math.log2(i + 1) for i in range(1, min(n_rel, DEPTH) + 1))
    return {
        f"hit@{k}": float(any(r <= k for r in ranks)),
        f"recall@{k}": sum(r <= k for r in ranks) / n_rel,
        "mrr": 1 / ranks[0] if ranks else 0.0,
        "ndcg@10": sum(1 / math.log2(r + 1) for r in ranks) / ideal,
    }


def evaluate(retriever: Retriever, items: Sequence[QAItem], k: int = 5, modes: Sequence[str] = MODES,
             params: SearchParams | None = None) -> dict[str, dict[str, float]]:
    """Mean metrics per mode: {mode: {"hit@k", "recall@k", "mrr", "ndcg@10"}}."""
    base = params or SearchParams()
    table: dict[str, dict[str, float]] = {}
    for mode in modes:
        sums: dict[str, float] = {}
        for item in items:
            hits = retriever.search(item.question, base, k=max(k, DEPTH), mode=mode)
            for name, value in query_metrics(hits, item.relevant, k).items():
                sums[name] = sums.get(name, 0.0) + value
        table[mode] = {name: total / len(items) for name, total in sums.items()}
    return table


def format_table(table: dict[str, dict[str, float]]) -> str:
    """A fixed-width table: one row per mode, one column per metric."""
    metrics = list(next(iter(table.values())))
    lines = ["mode     " + "".join(f"{m:>11}" for m in metrics)]
    for mode, row in table.items():
        lines.append(f"{mode:<9}" + "".join(f"{row[m]:>11.3f}" for m in metrics))
    return "\n".join(lines)
