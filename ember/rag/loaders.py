"""Loaders: files and folders -> Documents (source, text, kind, metadata) for the RAG index.

    for doc in load_documents(["notes/", "faq.jsonl", "paper.pdf"]): ...
    for doc in load_documents(["pydoc"]): ...        # the bundled Python documentation topics
    for doc in load_documents(["pydoc:while", "pydoc:for"]): ...    # some of them

Kinds: .txt .md .rst .py (as text), .html/.htm (text extracted, headings kept as markdown `#`),
.pdf (through pypdf, the `pdf` extra; pages joined by form feeds), .jsonl (one document per
record: a text field, the other fields become metadata). Folders are walked recursively in
sorted order, hidden files and folders left out. A missing path is an error; a file that is
binary, not UTF-8, unreadable or of an unsupported type is skipped with a warning naming it;
nothing to index at all is an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from ember.data.sources import jsonl_records
from ember.rag.errors import RagError, require

log = logging.getLogger(__name__)

TEXT_KINDS = {".txt": "txt", ".md": "md", ".markdown": "md", ".rst": "rst", ".py": "py"}
HTML_SUFFIXES = (".html", ".htm")
PYDOC = "pydoc"  # the path spec for the bundled Python documentation topics ("pydoc:NAME" for one)


@dataclass(frozen=True)
class Document:
    """One text to index: where it came from, what kind of text it is, and its metadata."""

    source: str
    text: str
    kind: str = "txt"  # txt, md, rst, py, html, pdf, jsonl: decides how chunking finds structure
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def hash(self) -> str:
        """Content hash of text + metadata: an unchanged hash means nothing to re-index."""
        h = hashlib.sha256(self.text.encode("utf-8"))
        h.update(json.dumps(dict(self.metadata), sort_keys=True).encode("utf-8"))
        return h.hexdigest()


def _read_text(path: Path) -> str | None:
    try:
        data = path.read_bytes()
    except OSError as e:
        log.warning("skipping %s: cannot read it (%s)", path, e.strerror or e)
        return None
    if b"\0" in data[:8192]:
        log.warning("skipping %s: binary file", path)
        return None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        log.warning("skipping %s: not valid UTF-8 text", path)
        return None


class _HTMLText(HTMLParser):
    """Visible text of an HTML page, with <h1>..<h6> as markdown headings and blocks as paragraphs."""

    _BLOCKS = {"p", "div", "section", "article", "li", "tr", "table", "ul", "ol", "pre", "blockquote",
               "header", "footer", "main", "dl", "dt", "dd", "figure", "br", "hr"}
    _HIDDEN = {"script", "style", "noscript", "template", "head", "title"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title = ""
        self._hidden = 0
        self._in_title = False
        self._pre = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self._HIDDEN:
            self._hidden += 1
        if tag == "title":
            self._in_title = True
        if tag == "pre":
            self._pre += 1
        if len(tag) == 2 and tag[0] == "h" and tag[1] in "123456":
            self.parts.append("\n\n" + "#" * int(tag[1]) + " ")
        elif tag in self._BLOCKS:
            self.parts.append("\n\n" if tag != "br" else "\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._HIDDEN:
            self._hidden = max(0, self._hidden - 1)
        if tag == "title":
            self._in_title = False
        if tag == "pre":
            self._pre = max(0, self._pre - 1)
        if (len(tag) == 2 and tag[0] == "h" and tag[1] in "123456") or tag in self._BLOCKS:
            self.parts.append("\n\n")

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        if self._hidden or not data:
            return
        if self._pre:  # inside <pre>, line breaks and indentation are content
            self.parts.append(data)
            return
        # Elsewhere HTML collapses whitespace; a space is kept between words of adjacent pieces.
        last = self.parts[-1][-1:] if self.parts and self.parts[-1] else "\n"
        words = " ".join(data.split())
        lead = " " if data[0].isspace() and last not in " \n" and words else ""
        trail = " " if data[-1].isspace() and words else ""
        self.parts.append(lead + words + trail)

    def text(self) -> str:
        out: list[str] = []
        for ln in "".join(self.parts).split("\n"):
            ln = ln.rstrip()
            if ln or (out and out[-1]):  # at most one blank line in a row
                out.append(ln)
        return "\n".join(out).strip("\n") + "\n"


def html_to_text(html: str) -> tuple[str, str]:
    """(visible text with markdown headings, page title) of an HTML document."""
    parser = _HTMLText()
    parser.feed(html)
    parser.close()
    return parser.text(), " ".join(parser.title.split())


def _pdf_document(path: Path) -> Document | None:
    pypdf = require("pypdf", extra="pdf")
    try:
        reader = pypdf.PdfReader(str(path))
        pages = [page.extract_text() or "" for page in reader.pages]
    except Exception as e:  # pypdf raises many types for damaged or encrypted files
        log.warning("skipping %s: cannot read the PDF (%s)", path, str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None
    if not any(p.strip() for p in pages):
        log.warning("skipping %s: the PDF has no extractable text (scanned images need OCR first)", path)
        return None
    return Document(str(path), "\f".join(pages), "pdf", {"pages": str(len(pages))})


def _jsonl_documents(path: Path, text_field: str) -> Iterator[Document]:
    if _read_text(path) is None:  # binary, not UTF-8 or unreadable: skipped with a warning
        return
    for lineno, record in jsonl_records(path):
        if not isinstance(record.get(text_field), str):
            raise RagError(f"{path}:{lineno}: expected an object with a string field {text_field!r} "
                           "(choose the field with --text-field)")
        body = record.pop(text_field)
        if not body.strip():
            continue
        # A record's own id keeps its source stable when lines move; else the line number names it.
        key = record.get("id")
        source = f"{path}#{key}" if isinstance(key, (str, int)) else f"{path}:{lineno}"
        meta = {k: v if isinstance(v, str) else json.dumps(v, ensure_ascii=False) for k, v in record.items()}
        yield Document(source, body, "jsonl", meta)


def load_file(path: Path, text_field: str = "text") -> Iterator[Document]:
    """The documents in one file (none, with a warning, when it cannot be read as text)."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _jsonl_documents(path, text_field)
        return
    if suffix == ".pdf":
        doc = _pdf_document(path)
        if doc:
            yield doc
        return
    text = _read_text(path)
    if text is None:
        return
    if not text.strip():
        log.warning("skipping %s: empty file", path)
        return
    if suffix in HTML_SUFFIXES:
        body, title = html_to_text(text)
        yield Document(str(path), body, "html", {"title": title} if title else {})
    else:
        yield Document(str(path), text, TEXT_KINDS.get(suffix, "txt"))


def is_supported(path: Path) -> bool:
    suffix = path.suffix.lower()
    return suffix in TEXT_KINDS or suffix in HTML_SUFFIXES or suffix in (".pdf", ".jsonl")


def pydoc_documents(topics: Iterable[str] | None = None) -> Iterator[Document]:
    """The bundled Python documentation topics (`help()` pages) as reStructuredText documents."""
    from ember.data.sources import pydoc_topics

    wanted = set(topics) if topics is not None else None
    for doc in pydoc_topics():
        if wanted is None or doc.source.removeprefix("pydoc:") in wanted:
            yield Document(doc.source, doc.text, "rst")


def list_files(path: Path) -> list[Path]:
    """Files under a folder in sorted order, hidden ones and unsupported types left out (with a warning)."""
    files, unsupported = [], []
    for f in sorted(path.rglob("*")):
        rel = f.relative_to(path).parts
        if any(part.startswith(".") for part in rel) or not f.is_file():
            continue
        (files if is_supported(f) else unsupported).append(f)
    if unsupported:
        shown = ", ".join(str(f) for f in unsupported[:5]) + (" ..." if len(unsupported) > 5 else "")
        log.warning("skipping %d file(s) of unsupported type under %s: %s", len(unsupported), path, shown)
    return files


def load_documents(paths: Iterable[str | Path], text_field: str = "text") -> Iterator[Document]:
    """Documents from files, folders and 'pydoc' / 'pydoc:NAME'; see the module docstring for the rules."""
    paths = [str(p) for p in paths]
    found = False
    for raw in paths:
        if raw == PYDOC or raw.startswith(PYDOC + ":"):
            name = raw.partition(":")[2]
            docs = list(pydoc_documents([name] if name else None))
            if name and not docs:
                raise RagError(f"{raw}: no such pydoc topic (see pydoc_data.topics.topics for the names)")
            found = found or bool(docs)
            yield from docs
            continue
        p = Path(raw).expanduser()
        if not p.exists():
            raise RagError(f"{p} does not exist: give files or folders to index (or 'pydoc')")
        for f in list_files(p) if p.is_dir() else [p]:
            for doc in load_file(f.resolve(), text_field):
                found = True
                yield doc
    if not found:
        raise RagError(f"nothing to index in {', '.join(paths)}: no readable .txt .md .rst .py .html .pdf "
                       ".jsonl files found")
