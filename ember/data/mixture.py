"""A weighted mixture of text sources, by share of training tokens (default 70 % prose / 30 % code).

    components = parse_mixture(["bundled"])                 # prose@0.7 + code@0.3
    components = parse_mixture(["docs/@0.6", "src/,extra.jsonl@0.4"])
    sets = prepare_mixture(components, tok, "runs/x/data")  # tokenize each into its own shards
    sched = MixtureSchedule([0.7, 0.3]); sched.next()       # component of the next sequence

Spec syntax: each item is one component, `PATHS[@WEIGHT]`, PATHS being comma-separated files or
folders (see ember.data.sources) or the bundled corpus: `bundled-prose` (Python's documentation
topics), `bundled-code` (its standard library) or `bundled` (both, 0.7 / 0.3). Either every
component has a weight or none does; without weights each component counts by its own size.

Sampling is a deterministic largest-deficit rule rather than random draws: after k sequences,
component i has been chosen as close to k * w_i times as integers allow, so token shares are
exact over any window and the schedule's state is just the pick counts (cheap to checkpoint,
identical on every rank). A component smaller than its share is repeated (several epochs).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ember.data.shards import VAL_FRACTION, TokenShards, build_shards, load_manifest, tokenizer_fingerprint
from ember.data.sources import DataSourceError, Document, path_documents, pydoc_topics, stdlib_sources
from ember.tokenizer import Tokenizer

log = logging.getLogger(__name__)

BUNDLED = {"bundled-prose": "prose", "bundled-code": "code"}
DEFAULT_MIXTURE = ("bundled-prose@0.7", "bundled-code@0.3")


@dataclass(frozen=True)
class Component:
    """One source of the mixture: where its documents come from and its share of tokens."""

    name: str
    paths: tuple[str, ...]
    weight: float | None


def parse_mixture(items: Sequence[str]) -> list[Component]:
    """Parse `PATHS[@WEIGHT]` items (see the module docstring) into components."""
    expanded: list[str] = []
    for item in items:
        expanded.extend(DEFAULT_MIXTURE if item.strip() == "bundled" else [item])
    if not expanded:
        raise DataSourceError("no data given: pass --data bundled, or files and folders of text")
    components: list[Component] = []
    for i, item in enumerate(expanded):
        spec, sep, weight_text = item.rpartition("@")
        if not sep:
            spec, weight_text = item, ""
        weight: float | None = None
        if weight_text:
            try:
                weight = float(weight_text)
            except ValueError:
                raise DataSourceError(f"data item {item!r}: the weight after '@' must be a number") from None
            if not weight > 0:
                raise DataSourceError(f"data item {item!r}: the weight must be positive")
        paths = tuple(p for p in spec.split(",") if p)
        if not paths:
            raise DataSourceError(f"data item {item!r} names no path")
        if any(p in BUNDLED for p in paths) and len(paths) > 1:
            raise DataSourceError(f"data item {item!r}: give bundled-prose/bundled-code as items of their own")
        base = BUNDLED.get(paths[0]) or Path(paths[0].rstrip("/")).stem or "data"
        name = f"{i}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', base)}"
        components.append(Component(name, paths, weight))
    given = [c.weight is not None for c in components]
    if any(given) and not all(given):
        raise DataSourceError("give a weight (PATH@WEIGHT) to every data item or to none of them")
    return components


def component_documents(c: Component, text_field: str = "text",
                        code_bytes: int | None = 4_000_000) -> Iterator[Document]:
    """The documents of one component, in a stable order."""
    if c.paths == ("bundled-prose",):
        yield from pydoc_topics()
    elif c.paths == ("bundled-code",):
        yield from stdlib_sources(max_bytes=code_bytes)
    else:
        yield from path_documents(c.paths, text_field)


def source_fingerprint(c: Component, text_field: str, code_bytes: int | None) -> str:
    """What the shards of a component were built from: paths plus each file's size and mtime."""
    parts = [repr(c.paths), text_field]
    if c.paths == ("bundled-code",):
        parts.append(str(code_bytes))
    for raw in c.paths:
        p = Path(raw).expanduser()
        if raw in BUNDLED or not p.exists():
            continue
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        parts += [f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def prepare_mixture(components: Sequence[Component], tok: Tokenizer, data_dir: str | Path, *,
                    val_fraction: float = VAL_FRACTION, text_field: str = "text",
                    code_bytes: int | None = 4_000_000, show_progress: bool = True) -> list[Path]:
    """Tokenize each component into data_dir/<name>/ unless current shards are already there."""
    for c in components:  # every path checked before any (slow) tokenizing starts
        for raw in c.paths:
            if raw not in BUNDLED and not Path(raw).expanduser().exists():
                raise DataSourceError(f"data path {raw} does not exist")
    folders = []
    for c in components:
        folder = Path(data_dir) / c.name
        source = source_fingerprint(c, text_field, code_bytes)
        manifest = load_manifest(folder)
        current = (manifest is not None and manifest["source"] == source
                   and manifest["tokenizer"] == tokenizer_fingerprint(tok)
                   and manifest["val_fraction"] == val_fraction)
        if current:
            log.info("reusing token shards in %s", folder)
        else:
            docs = component_documents(c, text_field, code_bytes)
            manifest = build_shards(docs, tok, folder, val_fraction=val_fraction, source=source,
                                    show_progress=show_progress)
            split = manifest["splits"]
            log.info("tokenized %s: %d train tokens (%d docs), %d validation tokens (%d docs)", c.name,
                     split["train"]["tokens"], split["train"]["documents"], split["val"]["tokens"],
                     split["val"]["documents"])
        folders.append(folder)
    return folders


def mixture_weights(components: Sequence[Component], train: Sequence[TokenShards]) -> list[float]:
    """Normalised token shares: the given weights, or each component's own token count."""
    raw = [c.weight if c.weight is not None else float(t.num_tokens) for c, t in zip(components, train)]
    total = sum(raw)
    return [w / total for w in raw]


class MixtureSchedule:
    """Which component each successive sequence comes from (largest deficit first)."""

    def __init__(self, weights: Sequence[float]) -> None:
        total = float(sum(weights))
        self.weights = [w / total for w in weights]
        self.picks = [0] * len(self.weights)

    def next(self) -> int:
        k = sum(self.picks) + 1
        deficits = [w * k - p for w, p in zip(self.weights, self.picks)]
        i = max(range(len(deficits)), key=lambda j: (deficits[j], -j))
        self.picks[i] += 1
        return i

    def state_dict(self) -> dict:
        return {"picks": list(self.picks)}

    def load_state_dict(self, state: dict) -> None:
        if len(state["picks"]) != len(self.picks):
            raise DataSourceError(f"the checkpoint's data position has {len(state['picks'])} mixture "
                                  f"components but this run has {len(self.picks)}; resume with the same --data")
        self.picks = [int(p) for p in state["picks"]]
