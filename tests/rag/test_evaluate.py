"""Evaluation metrics on hand-made rankings, the QA file format, and the pydoc question set itself."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from ember.rag.chunking import Chunk
from ember.rag.errors import RagError
from ember.rag.evaluate import format_table, load_qa, query_metrics
from ember.rag.store import Hit

FIXTURE = Path(__file__).parent / "fixtures" / "pydoc_qa.jsonl"


def ranking(*sources: str) -> list[Hit]:
    return [Hit(Chunk(f"id{i}", s, i, 0, 1, (), "t", "h"), 1.0) for i, s in enumerate(sources)]


def test_metrics_count_each_relevant_entry_once_at_its_first_chunk() -> None:
    hits = ranking("x", "a", "a", "y", "b", "z", "c")
    m = query_metrics(hits, ["a", "b", "c"], k=5)
    assert m["hit@5"] == 1.0
    assert m["recall@5"] == pytest.approx(2 / 3)  # a and b in the top 5, c at 7
    assert m["mrr"] == pytest.approx(1 / 2)
    ideal = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert m["ndcg@10"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(6) + 1 / math.log2(8)) / ideal)
    miss = query_metrics(ranking("x", "y"), ["a"], k=5)
    assert miss == {"hit@5": 0.0, "recall@5": 0.0, "mrr": 0.0, "ndcg@10": 0.0}
    by_id = query_metrics(hits, ["id4"], k=3)  # chunk ids work as relevance too
    assert (by_id["hit@3"], by_id["mrr"]) == (0.0, pytest.approx(1 / 5))


def test_format_table_has_a_row_per_mode() -> None:
    text = format_table({"dense": {"mrr": 0.5}, "hybrid": {"mrr": 0.75}})
    assert text.splitlines()[1].split() == ["dense", "0.500"] and "hybrid" in text


def test_qa_file_errors_name_the_line(tmp_path) -> None:
    with pytest.raises(RagError, match="does not exist"):
        load_qa(tmp_path / "none.jsonl")
    bad = tmp_path / "qa.jsonl"
    bad.write_text('{"question": "q", "relevant": ["a"]}\n{"question": "q2"}\n')
    with pytest.raises(RagError, match=r"qa.jsonl:2"):
        load_qa(bad)
    bad.write_text("\n")
    with pytest.raises(RagError, match="no questions"):
        load_qa(bad)


def test_the_pydoc_question_set() -> None:
    """>= 50 questions, each about a distinct topic, in our own words, with honest relevance:
    `relevant` is exactly the set of topics whose text holds the answering passage (`evidence`),
    which is more than one topic where the documentation repeats a section."""
    from pydoc_data.topics import topics

    def norm(text: str) -> str:
        return " ".join(text.split())

    rows = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    assert len(rows) >= 50 and len(load_qa(FIXTURE)) == len(rows)
    assert len({r["topic"] for r in rows}) == len(rows)
    docs = {f"pydoc:{k}": norm(v) for k, v in topics.items()}
    for r in rows:
        holders = sorted(k for k, text in docs.items() if r["evidence"] in text)
        assert r["topic"] in holders and r["relevant"] == holders, r["question"]
        words = re.findall(r"\w+", r["question"].lower())
        text = " ".join(re.findall(r"\w+", docs[r["topic"]].lower()))
        copied = [" ".join(words[i:i + 7]) for i in range(len(words) - 6) if " ".join(words[i:i + 7]) in text]
        assert not copied, (r["question"], copied)  # no 7-word run lifted from the documentation
