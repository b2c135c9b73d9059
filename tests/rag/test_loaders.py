"""Loaders: every supported kind of file, jsonl metadata, and the bad inputs (warnings and errors)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from ember.errors import EmberError
from ember.rag.errors import RagError
from ember.rag.loaders import html_to_text, load_documents, pydoc_documents


def minimal_pdf(pages: list[str]) -> bytes:
    """A valid PDF with one line of Helvetica text per page (objects and xref written by hand)."""
    n = len(pages)
    objs = [b"<< /Type /Catalog /Pages 2 0 R >>",
            b"<< /Type /Pages /Kids [" + b" ".join(f"{3 + 2 * i} 0 R".encode() for i in range(n))
            + f"] /Count {n} >>".encode()]
    font = 3 + 2 * n
    for i, text in enumerate(pages):
        stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
        objs.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {4 + 2 * i} 0 R "
                    f"/Resources << /Font << /F1 {font} 0 R >> >> >>".encode())
        objs.append(b"<< /Length " + str(len(stream)).encode() + b" >>\nstream\n" + stream + b"\nendstream")
    objs.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for i, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def test_every_kind_loads_with_its_structure(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# Title\n\nSome *markdown*.\n")
    (tmp_path / "b.rst").write_text("Title\n=====\n\nSome reST.\n")
    (tmp_path / "c.txt").write_text("plain text\n")
    (tmp_path / "d.py").write_text("def f():\n    return 1\n")
    (tmp_path / "e.html").write_text("<html><head><title>Page T</title><style>x{}</style></head><body>"
                                     "<h2>Intro</h2><p>Hello <b>world</b>.</p><script>var x;</script>"
                                     "<pre>code\n  indented</pre></body></html>")
    (tmp_path / "f.jsonl").write_text(json.dumps({"id": "q1", "text": "first record", "lang": "en", "n": 3}) + "\n"
                                      + json.dumps({"text": "second record"}) + "\n")
    pytest.importorskip("pypdf")
    (tmp_path / "g.pdf").write_bytes(minimal_pdf(["Hello from page one", "And page two"]))
    docs = {Path(d.source).name: d for d in load_documents([tmp_path])}
    assert docs["a.md"].kind == "md" and docs["b.rst"].kind == "rst" and docs["c.txt"].kind == "txt"
    assert docs["d.py"].kind == "py"
    html = docs["e.html"]
    assert html.kind == "html" and html.metadata == {"title": "Page T"}
    assert "## Intro" in html.text and "Hello world." in html.text and "code\n  indented" in html.text
    assert "var x" not in html.text and "x{}" not in html.text
    rec = docs["f.jsonl#q1"]
    assert rec.text == "first record" and rec.metadata == {"id": "q1", "lang": "en", "n": "3"}
    assert rec.source.endswith("f.jsonl#q1")
    assert docs["f.jsonl:2"].text == "second record"  # no id: the line number names it
    pdf = docs["g.pdf"]
    assert pdf.kind == "pdf" and pdf.text.split("\f") == ["Hello from page one", "And page two"]
    # sources are absolute paths, so the same file ingested from another folder is the same source
    assert all(Path(d.source).is_absolute() for d in docs.values())


def test_html_headings_become_markdown() -> None:
    text, title = html_to_text("<title> My  page </title><h1>Top</h1><p>a&amp;b</p><h3>Sub</h3><ul><li>x</li></ul>")
    assert title == "My page"
    assert text.splitlines() == ["# Top", "", "a&b", "", "### Sub", "", "x"]


def test_bad_files_are_skipped_with_a_warning_naming_them(tmp_path: Path, caplog) -> None:
    (tmp_path / "good.txt").write_text("fine text\n")
    (tmp_path / "binary.txt").write_bytes(b"\x00\x01\x02 not text")
    (tmp_path / "latin1.md").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "empty.md").write_text("  \n")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.md").write_text("secret")
    pytest.importorskip("pypdf")
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4 garbage")
    with caplog.at_level(logging.WARNING):
        docs = list(load_documents([tmp_path]))
    assert [Path(d.source).name for d in docs] == ["good.txt"]
    log = caplog.text
    for name, why in [("binary.txt", "binary"), ("latin1.md", "UTF-8"), ("empty.md", "empty"),
                      ("image.png", "unsupported"), ("broken.pdf", "PDF")]:
        assert name in log and why in log, (name, log)
    assert "x.md" not in log


def test_missing_path_and_nothing_to_index_are_errors(tmp_path: Path) -> None:
    with pytest.raises(RagError, match="does not exist"):
        list(load_documents([tmp_path / "nope"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(RagError, match="nothing to index"):
        list(load_documents([tmp_path / "empty"]))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json}\n')
    with pytest.raises(EmberError, match=r"bad.jsonl:2: not valid JSON"):
        list(load_documents([bad]))
    bad.write_text('{"body": "ok"}\n')
    with pytest.raises(RagError, match="--text-field"):
        list(load_documents([bad]))


def test_pydoc_is_the_bundled_documentation() -> None:
    docs = list(load_documents(["pydoc"]))
    from pydoc_data.topics import topics

    assert len(docs) == len([t for t in topics.values() if t.strip()])
    assert docs[0].source.startswith("pydoc:") and docs[0].kind == "rst"
    assert [d.source for d in pydoc_documents(["while", "yield"])] == ["pydoc:while", "pydoc:yield"]
    assert [d.source for d in load_documents(["pydoc:yield", "pydoc:while"])] == ["pydoc:yield", "pydoc:while"]
    with pytest.raises(RagError, match="no such pydoc topic"):
        list(load_documents(["pydoc:nonsense"]))
