"""Chunking: sizes in the embedder's real tokens, cuts at headings > paragraphs > sentences > tokens,
overlap, spans, heading paths and stable ids."""

from __future__ import annotations

import pytest

from ember.rag.chunking import Chunker
from ember.rag.errors import RagError
from ember.rag.loaders import Document, pydoc_documents

SIZE, OVERLAP = 62, 12


@pytest.fixture(scope="module")
def chunker(tiny_embedder) -> Chunker:
    return Chunker(tiny_embedder.token_offsets, SIZE, OVERLAP)


def sentences(word: str, n: int) -> str:
    return " ".join(f"The {word} number {i} is here." for i in range(n))


def test_chunks_fit_the_embedder_and_cover_the_document(chunker, tiny_embedder) -> None:
    doc = next(pydoc_documents(["compound"]))
    chunks = chunker.split(doc)
    assert len(chunks) > 50
    covered = set()
    for prev, c in zip([None] + chunks, chunks):
        assert tiny_embedder.count_tokens(c.context) <= SIZE  # never truncated by the embedder
        assert c.text == doc.text[c.start:c.end] and c.text.strip() == c.text
        assert c.position == chunks.index(c) and c.source == "pydoc:compound"
        if prev is not None:
            assert prev.start < c.start <= prev.end + 3  # in order, overlapping or touching
        covered.update(range(c.start, c.end))
    assert all(i in covered for i, ch in enumerate(doc.text) if not ch.isspace())


def test_a_heading_ends_a_chunk_and_starts_a_clean_one(chunker) -> None:
    text = "# Alpha\n\n" + sentences("alpha", 4) + "\n\n## Beta\n\n" + sentences("beta", 4) + "\n"
    chunks = chunker.split(Document("d.md", text, "md"))
    assert [c.headings for c in chunks] == [("Alpha",), ("Alpha", "Beta")]
    assert chunks[0].text.endswith("alpha number 3 is here.")
    assert chunks[1].text.startswith("## Beta") and "alpha" not in chunks[1].text  # no overlap across it
    assert chunks[1].context.startswith("Alpha > Beta\n## Beta")


def test_paragraphs_win_over_sentences_and_overlap_steps_back(chunker) -> None:
    paras = [sentences(w, 3) for w in ("red", "green", "blue", "cyan", "pink")]
    text = "\n\n".join(paras) + "\n"
    chunks = chunker.split(Document("d.txt", text, "txt"))
    assert len(chunks) >= 3
    for c in chunks[:-1]:
        assert text[c.end:c.end + 2] == "\n\n"  # each cut at a paragraph end
    for a, b in zip(chunks, chunks[1:]):
        shared = a.end - b.start
        assert 0 < shared  # the next chunk repeats the tail of this one ...
        assert text[b.start - 1] == " " and text[b.start - 2] == "."  # ... from a sentence start


def test_an_unbroken_run_is_cut_by_tokens_with_exact_overlap(chunker, tiny_embedder) -> None:
    text = " ".join(["lorem"] * 200)
    chunks = chunker.split(Document("d.txt", text, "txt"))
    counts = [tiny_embedder.count_tokens(c.text) for c in chunks]
    assert counts[:-1] == [SIZE] * (len(chunks) - 1)
    starts = [tiny_embedder.count_tokens(text[:c.start]) for c in chunks]
    assert all(b - a == SIZE - OVERLAP for a, b in zip(starts, starts[1:]))


def test_code_is_cut_at_top_level_definitions(chunker) -> None:
    body = "\n".join(f"    x{i} = {i} * {i}" for i in range(8))
    imports = "".join(f"import mod{i}\n" for i in range(14))
    text = imports + "\n\n@decorator\ndef first():\n" + body + "\n\n\nclass Second:\n" + body + "\n"
    chunks = chunker.split(Document("m.py", text, "py"))
    starts = [c.text.splitlines()[0] for c in chunks]
    assert "@decorator" in starts and "class Second:" in starts
    assert chunks[starts.index("class Second:")].headings == ("class Second",)
    assert chunks[starts.index("@decorator")].headings == ("def first",)


def test_reST_titles_and_pdf_pages_give_heading_paths(chunker) -> None:
    rst = "Guide\n*****\n\nIntro text.\n\nPart one\n========\n\n" + sentences("one", 8) + "\n"
    paths = {c.headings for c in chunker.split(Document("g.rst", rst, "rst"))}
    assert ("Guide", "Part one") in paths
    pdf = sentences("first", 5) + "\f" + sentences("second", 5)
    chunks = chunker.split(Document("p.pdf", pdf, "pdf"))
    assert [c.headings for c in chunks] == [("page 1",), ("page 2",)]


def test_ids_depend_on_source_and_content_only(chunker) -> None:
    paras = [sentences(w, 3) for w in ("red", "green", "blue", "cyan")]
    a = chunker.split(Document("a.txt", "\n\n".join(paras)))
    assert [c.id for c in a] == [c.id for c in chunker.split(Document("a.txt", "\n\n".join(paras)))]
    assert not {c.id for c in a} & {c.id for c in chunker.split(Document("b.txt", "\n\n".join(paras)))}
    edited = chunker.split(Document("a.txt", "\n\n".join(paras[:-1] + [sentences("gold", 3)])))
    same = {c.id for c in a} & {c.id for c in edited}
    assert same and len(same) < len(a)  # the untouched head keeps its ids
    twice = chunker.split(Document("t.txt", "\n\n".join([paras[0]] * 2 + [paras[1]] * 2)))
    assert len({c.id for c in twice}) == len(twice)  # a repeated chunk gets its own id


def test_chunking_is_unaffected_by_embedding_calls(tiny_embedder) -> None:
    # transformers turns truncation on in the tokenizer it shares with the model during encode();
    # chunking must measure whole documents all the same.
    doc = next(pydoc_documents(["compound"]))
    chunker = Chunker(tiny_embedder.token_offsets, SIZE, OVERLAP)
    before = chunker.split(doc)
    tiny_embedder.embed_documents([doc.text])
    assert [c.id for c in chunker.split(doc)] == [c.id for c in before]


def test_bad_settings_are_errors(tiny_embedder) -> None:
    with pytest.raises(RagError, match="too small"):
        Chunker(tiny_embedder.token_offsets, 8, 0)
    with pytest.raises(RagError, match="overlap 40"):
        Chunker(tiny_embedder.token_offsets, 64, 40)
