"""Structure-aware chunking measured in the embedder's tokens.

    chunker = Chunker(embedder.token_offsets, size=256, overlap=51)
    chunks = chunker.split(document)          # list[Chunk], each <= size tokens with its heading line

A document is cut where its structure says so. Every position between tokens has a strength:

    4 heading     a markdown `#` line, an underlined reST title, a top-level def/class, a PDF page
    3 paragraph   after a blank line
    2 sentence    after . ! ? (and closing quotes or brackets)
    1 line        after a line break
    0 token       anywhere else

Each chunk takes at most `size` tokens (its heading line included) and ends at the strongest
position in the second half of its window (the latest one of that strength), so headings and
paragraphs win over sentences and a hard token cut happens only inside a long unbroken run.
The next chunk starts `overlap` tokens back (at the strongest position there), except after a
heading cut, where a new section starts clean. Each chunk records its source, position, character
span, the heading path at its start and a content hash; its id derives from source + hash.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from ember.rag.errors import RagError
from ember.rag.loaders import Document

HEADING, PARAGRAPH, SENTENCE, LINE, TOKEN = 4, 3, 2, 1, 0
# Heading lines are kept short in the embedded text: a cap in tokens on the heading prefix.
MAX_HEADING_FRACTION = 0.25

TokenOffsets = Callable[[str], Sequence[tuple[int, int]]]

_MD_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$", re.M)
_FENCE = re.compile(r"^(```|~~~)", re.M)
_RST_ADORNMENT = re.compile(r"^([=\-`:'\"~^_*+#<>.])\1{2,}[ \t]*$")
_PY_TOP = re.compile(r"^(@|(async[ \t]+)?def[ \t]+(\w+)|class[ \t]+(\w+))", re.M)
_PY_INNER_DEF = re.compile(r"^[ \t]+(async[ \t]+)?def[ \t]+\w+", re.M)
_BLANK_RUN = re.compile(r"\n[ \t]*\n\s*")
_SENTENCE_END = re.compile(r"[.!?][\"'”’)\]]*\s+(?=\S)")


@dataclass(frozen=True)
class Chunk:
    """A piece of a document as stored in the index (the vector lives beside it in the store)."""

    id: str
    source: str
    position: int  # index of the chunk within its document
    start: int  # character span in the document text
    end: int
    headings: tuple[str, ...]
    text: str
    hash: str  # sha256 of the text
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def context(self) -> str:
        """The text that is embedded and indexed for BM25: the heading path line, then the text."""
        return f"{' > '.join(self.headings)}\n{self.text}" if self.headings else self.text

    def to_dict(self) -> dict:
        return {"id": self.id, "source": self.source, "position": self.position, "start": self.start,
                "end": self.end, "headings": list(self.headings), "text": self.text, "hash": self.hash,
                "metadata": dict(self.metadata)}


def chunk_id(source: str, content_hash: str, occurrence: int = 0) -> str:
    """A stable id (UUID-shaped, as Qdrant wants) from the source, the content hash and which repeat it is."""
    h = hashlib.sha256(f"{source}\0{content_hash}\0{occurrence}".encode("utf-8")).hexdigest()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def _headings(text: str, kind: str) -> list[tuple[int, int, str]]:
    """(char position, level, title) of each heading; the position is where the section starts."""
    found: list[tuple[int, int, str]] = []
    if kind in ("md", "html", "txt", "jsonl"):
        fences = [m.start() for m in _FENCE.finditer(text)]
        for m in _MD_HEADING.finditer(text):
            if bisect.bisect(fences, m.start()) % 2 == 0:  # not inside a ``` code block
                found.append((m.start(), len(m.group(1)), m.group(2).strip()))
    if kind in ("rst", "txt"):
        levels: dict[tuple[str, bool], int] = {}
        lines = text.split("\n")
        offsets = [0]
        for ln in lines:
            offsets.append(offsets[-1] + len(ln) + 1)
        for i in range(1, len(lines)):
            under = _RST_ADORNMENT.match(lines[i])
            title = lines[i - 1].strip()
            if not under or not title or _RST_ADORNMENT.match(lines[i - 1]) or len(lines[i].rstrip()) < len(title):
                continue
            over = i >= 2 and lines[i - 2].rstrip() == lines[i].rstrip()
            level = levels.setdefault((under.group(1), over), len(levels) + 1)
            found.append((offsets[i - 2] if over else offsets[i - 1], level, title))
    if kind == "py":
        pending = None  # a decorator run starts the section of the def/class that follows it
        for m in _PY_TOP.finditer(text):
            if m.group(1) == "@":
                pending = m.start() if pending is None else pending
                continue
            name = f"def {m.group(3)}" if m.group(3) else f"class {m.group(4)}"
            found.append((m.start() if pending is None else pending, 1, name))
            pending = None
    if kind == "pdf":
        found.append((0, 1, "page 1"))
        found += [(m.end(), 1, f"page {i}") for i, m in enumerate(re.finditer("\f", text), 2)]
    return sorted(found)


def _boundaries(text: str, kind: str, headings: list[tuple[int, int, str]]) -> dict[int, int]:
    """Character position -> strength of cutting there (the strongest reason wins)."""
    strength: dict[int, int] = {}

    def mark(pos: int, s: int) -> None:
        if 0 < pos < len(text) and strength.get(pos, -1) < s:
            strength[pos] = s

    for m in re.finditer("\n", text):
        mark(m.end(), LINE)
    if kind != "py":
        for m in _SENTENCE_END.finditer(text):
            mark(m.end(), SENTENCE)
    else:
        for m in _PY_INNER_DEF.finditer(text):
            mark(m.start(), PARAGRAPH)
    for m in _BLANK_RUN.finditer(text):
        mark(m.end(), PARAGRAPH)
    for pos, _, _ in headings:
        mark(pos, HEADING)
    return strength


class Chunker:
    """Splits Documents into Chunks of at most `size` tokens with `overlap` tokens of overlap."""

    def __init__(self, token_offsets: TokenOffsets, size: int, overlap: int) -> None:
        if size < 16:
            raise RagError(f"chunk size {size} is too small: use at least 16 tokens")
        if not 0 <= overlap <= size // 2:
            raise RagError(f"chunk overlap {overlap} must be between 0 and half the chunk size ({size // 2})")
        self.token_offsets = token_offsets
        self.size = size
        self.overlap = overlap

    def _heading_path(self, headings: list[tuple[int, int, str]], pos: int) -> tuple[str, ...]:
        path: list[tuple[int, str]] = []
        for hpos, level, title in headings:
            if hpos > pos:
                break
            while path and path[-1][0] >= level:
                path.pop()
            path.append((level, title))
        return tuple(t for _, t in path)

    def _prefix_tokens(self, path: tuple[str, ...]) -> tuple[tuple[str, ...], int]:
        """The heading path trimmed (outermost first) to fit its token cap, and its token count."""
        cap = int(self.size * MAX_HEADING_FRACTION)
        while path:
            n = len(self.token_offsets(" > ".join(path))) + 1
            if n <= cap:
                return path, n
            path = path[1:]
        return (), 0

    def split(self, doc: Document) -> list[Chunk]:
        text = doc.text
        offsets = self.token_offsets(text)
        if not offsets:
            return []
        starts = [s for s, _ in offsets]
        n = len(offsets)
        headings = _headings(text, doc.kind)
        # token index -> strongest cut strength at the start of that token
        cut_strength = [TOKEN] * (n + 1)
        for pos, s in _boundaries(text, doc.kind, headings).items():
            i = bisect.bisect_left(starts, pos)
            if 0 < i < n:
                cut_strength[i] = max(cut_strength[i], s)
        cut_strength[n] = HEADING

        spans: list[tuple[int, int, tuple[str, ...]]] = []
        start = 0
        while start < n:
            path, prefix = self._prefix_tokens(self._heading_path(headings, offsets[start][0]))
            budget = self.size - prefix
            if start + budget >= n:
                spans.append((start, n, path))
                break
            lo, hi = start + max(budget // 2, self.overlap + 1), start + budget
            best = max(range(lo, hi + 1), key=lambda i: (cut_strength[i], i))
            spans.append((start, best, path))
            if cut_strength[best] == HEADING or self.overlap == 0:
                start = best
            else:  # step back `overlap` tokens, to the strongest position in that tail
                tail = range(best - self.overlap, best)
                start = max(tail, key=lambda i: (cut_strength[i], -i))
        return self._chunks(doc, offsets, spans)

    def _chunks(self, doc: Document, offsets: Sequence[tuple[int, int]],
                spans: list[tuple[int, int, tuple[str, ...]]]) -> list[Chunk]:
        chunks: list[Chunk] = []
        seen: dict[str, int] = {}
        for a, b, path in spans:
            lo, hi = offsets[a][0], offsets[b - 1][1]
            body = doc.text[lo:hi]
            content_hash = hashlib.sha256(body.encode("utf-8")).hexdigest()
            occurrence = seen.get(content_hash, 0)
            seen[content_hash] = occurrence + 1
            chunks.append(Chunk(chunk_id(doc.source, content_hash, occurrence), doc.source, len(chunks), lo, hi,
                                path, body, content_hash, dict(doc.metadata)))
        return chunks


def metadata_tags(metadata: Mapping[str, str]) -> list[str]:
    """The `key=value` strings that metadata filters match against (stored with each chunk)."""
    return [f"{k}={v}" for k, v in sorted(metadata.items())]


def metadata_json(metadata: Mapping[str, str]) -> str:
    return json.dumps(dict(metadata), sort_keys=True, ensure_ascii=False)
