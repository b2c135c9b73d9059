"""Text sources, starting with the bundled corpus that every machine with Python has.

Prose: the installed Python's `pydoc_data.topics` (the language reference topics that `help()`
shows). Code: the standard library's own `.py` sources (tests and vendored tools left out).
Both are real, offline and deterministic, so the quickstart, tests and benchmarks train on them.

    for doc in pydoc_topics(): ...          # Document(source="pydoc:assert", text=...)
    for doc in stdlib_sources(max_bytes=2_000_000): ...
    for doc in path_documents(["notes/", "data.jsonl"]): ...   # user files and folders
"""

from __future__ import annotations

import json
import logging
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ember.errors import EmberError

log = logging.getLogger(__name__)

# Stdlib folders that are tests, data or third-party code rather than the library itself.
_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__",
              "turtledemo", "ensurepip", "pydoc_data"}


@dataclass(frozen=True)
class Document:
    """One text with the place it came from (a path, or 'pydoc:<topic>')."""

    source: str
    text: str


def pydoc_topics() -> Iterator[Document]:
    """The Python documentation topics in sorted order (English prose with some code)."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        text = topics[name].strip()
        if text:
            yield Document(f"pydoc:{name}", text + "\n")


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The standard library's .py files in a stable order."""
    root = stdlib_dir()
    return sorted(p for p in root.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(root).parts))


def stdlib_sources(max_bytes: int | None = None, after: bool = False) -> Iterator[Document]:
    """Standard-library source files as text; files that are not valid UTF-8 are skipped.

    max_bytes: stop before the first file that would take the total past it. after=True yields
    the files from there on instead: the code a corpus capped at max_bytes never contains."""
    total = 0
    for path in stdlib_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few stdlib files are deliberately not UTF-8
        if not text.strip():
            continue
        if max_bytes is not None and total + len(text) > max_bytes:
            if not after:
                return
            max_bytes = None  # past the cap: every later file
        elif after and max_bytes is not None:
            total += len(text)
            continue
        total += len(text)
        yield Document(str(path), text)


TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")


class DataSourceError(EmberError):
    """A data path that is missing, empty or malformed."""


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        log.warning("skipping %s: not valid UTF-8", path)
    except OSError as e:
        log.warning("skipping %s: %s", path, e.strerror or e)
    return None


def jsonl_records(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-empty line of a jsonl file; a malformed line is an error."""
    lineno = 0
    try:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataSourceError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(record, dict):
                    raise DataSourceError(f"{path}:{lineno}: expected a JSON object per line")
                yield lineno, record
    except UnicodeDecodeError:
        raise DataSourceError(f"{path}: not UTF-8 text after line {lineno}; expected a jsonl file") from None


def jsonl_documents(path: Path, text_field: str = "text") -> Iterator[Document]:
    """Documents from a jsonl file; a malformed line is an error naming the file and line."""
    for lineno, record in jsonl_records(path):
        if not isinstance(record.get(text_field), str):
            raise DataSourceError(f"{path}:{lineno}: expected an object with a string field {text_field!r}")
        if record[text_field].strip():
            yield Document(f"{path}:{lineno}", record[text_field])


def path_documents(paths: Iterable[str | Path], text_field: str = "text") -> Iterator[Document]:
    """Documents from files and folders: .txt/.md/.rst/.py as whole texts, .jsonl by a text field.

    Folders are walked recursively in sorted order. A missing path, or paths that yield no
    text at all, are errors; unreadable files are skipped with a warning.
    """
    found = False
    for raw in paths:
        p = Path(raw).expanduser()
        if not p.exists():
            raise DataSourceError(f"data path {p} does not exist")
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            if f.suffix == ".jsonl":
                for doc in jsonl_documents(f, text_field):
                    found = True
                    yield doc
            elif f.suffix in TEXT_SUFFIXES or not p.is_dir():
                text = _read_text(f)
                if text and text.strip():
                    found = True
                    yield Document(str(f), text)
    if not found:
        raise DataSourceError(f"no text found in {', '.join(map(str, paths))} "
                              f"(looked for {', '.join(TEXT_SUFFIXES)} and .jsonl files)")


def bundled_documents(code_bytes: int | None = 4_000_000) -> Iterator[Document]:
    """The bundled corpus: every pydoc topic, then standard-library code up to code_bytes."""
    yield from pydoc_topics()
    yield from stdlib_sources(max_bytes=code_bytes)


def documents(spec: Iterable[str], text_field: str = "text",
              code_bytes: int | None = 4_000_000) -> Iterator[Document]:
    """Documents from a list of paths, where the word 'bundled' stands for the bundled corpus."""
    spec = list(spec)
    if "bundled" in spec:
        yield from bundled_documents(code_bytes)
    paths = [s for s in spec if s != "bundled"]
    if paths:
        yield from path_documents(paths, text_field)
