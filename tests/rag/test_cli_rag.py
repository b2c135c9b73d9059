"""`ember rag ingest|search|ask|eval` end to end (in-process: the same dispatch as the console
script), and the user errors printed as one line."""

from __future__ import annotations

import json

import pytest

from conftest import write_corpus
from ember.__main__ import main, run


@pytest.fixture
def built(tmp_path, tiny_embedder_dir, capsys):
    docs = tmp_path / "docs"
    write_corpus(docs)
    (docs / "faq.jsonl").write_text(json.dumps({"id": "k1", "text": "Kiwis are small and fuzzy.", "lang": "en"}) + "\n"
                                    + json.dumps({"id": "k2", "text": "Kiwis sind klein.", "lang": "de"}) + "\n")
    idx = tmp_path / "idx"
    assert run(["rag", "ingest", str(docs), "--index", str(idx), "--embedder", str(tiny_embedder_dir),
                "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "8 new, 0 changed" in out and "chunks in the index" in out
    return docs, idx


def test_search_prints_ranked_chunks_and_json(built, capsys) -> None:
    docs, idx = built
    run(["rag", "search", "banana records", "--index", str(idx), "--k", "3", "--mode", "bm25"])
    out = capsys.readouterr().out
    assert out.startswith("[1] ") and "banana" in out.split("\n")[0] and "(score " in out
    run(["rag", "search", "kiwis", "--index", str(idx), "--k", "5", "--where", "lang=de", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert [r["text"] for r in rows] == ["Kiwis sind klein."]
    assert set(rows[0]) >= {"rank", "score", "source", "text", "id", "headings", "position"}
    assert rows[0]["source"].endswith("faq.jsonl#k2") and rows[0]["metadata"]["lang"] == "de"


def test_reingest_through_the_cli_is_a_no_op(built, capsys) -> None:
    docs, idx = built
    run(["rag", "ingest", str(docs), "--index", str(idx), "--no-progress"])  # the index remembers its embedder
    assert "0 new, 0 changed, 8 unchanged" in capsys.readouterr().out


def test_eval_prints_a_table_per_mode(built, tmp_path, capsys) -> None:
    docs, idx = built
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": f"{w} records and summaries", "relevant": [str(docs / f)]}) + "\n"
                          for w, f in [("apple", "apple.md"), ("cherry", "cherry.md"), ("banana", "banana.txt")]))
    run(["rag", "eval", "--qa", str(qa), "--index", str(idx), "--json"])
    table = json.loads(capsys.readouterr().out)
    assert set(table) == {"dense", "bm25", "hybrid"} and table["bm25"]["hit@5"] == 1.0
    run(["rag", "eval", "--qa", str(qa), "--index", str(idx), "--modes", "bm25"])
    assert "recall@5" in capsys.readouterr().out


def test_ask_answers_with_numbered_sources(built, chat_model_dir, capsys) -> None:
    docs, idx = built
    run(["rag", "ask", "What does the banana module keep?", "--index", str(idx), "--model", str(chat_model_dir),
         "--max-tokens", "16", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert isinstance(result["answer"], str) and result["sources"]
    assert [s["n"] for s in result["sources"]] == list(range(1, len(result["sources"]) + 1))
    run(["rag", "ask", "What does the banana module keep?", "--index", str(idx), "--model", str(chat_model_dir),
         "--max-tokens", "16"])
    out = capsys.readouterr().out
    assert "\nSources:\n" in out and "[1] " in out


@pytest.mark.parametrize("args, needle", [
    (["rag", "search", "x", "--index", "{tmp}/none"], "no RAG index at"),
    (["rag", "ingest", "{tmp}/empty", "--index", "{tmp}/idx2", "--embedder", "{emb}"], "nothing to index"),
    (["rag", "ingest", "{tmp}/nope", "--index", "{tmp}/idx3", "--embedder", "{emb}"], "does not exist"),
    (["rag", "eval", "--qa", "{tmp}/none.jsonl", "--index", "{idx}"], "QA file"),
    (["rag", "search", "x", "--index", "{idx}", "--where", "lang"], "key=value"),
    (["rag", "ingest", "{docs}", "--index", "{idx}", "--embedder", "{tmp}/no-model"], "not a folder"),
])
def test_user_errors_are_one_line(built, tmp_path, tiny_embedder_dir, capsys, args, needle) -> None:
    docs, idx = built
    (tmp_path / "empty").mkdir(exist_ok=True)
    argv = [a.format(tmp=tmp_path, emb=tiny_embedder_dir, idx=idx, docs=docs) for a in args]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and " WARNING " not in ln]
    assert len(err) == 1 and needle in err[0] and err[0].startswith("ember rag: error:"), err


def test_qdrant_local_through_the_cli(tmp_path, tiny_embedder_dir, capsys) -> None:
    docs = tmp_path / "docs"
    write_corpus(docs, n=3)
    idx = tmp_path / "qidx"
    run(["rag", "ingest", str(docs), "--index", str(idx), "--embedder", str(tiny_embedder_dir), "--qdrant-local",
         "--no-progress"])
    assert "3 new" in capsys.readouterr().out
    assert json.loads((idx / "index.json").read_text())["store"]["kind"] == "qdrant"
    run(["rag", "search", "cherry summaries", "--index", str(idx), "--mode", "bm25", "--k", "2", "--json"])
    assert all(r["source"].endswith("cherry.md") for r in json.loads(capsys.readouterr().out))
