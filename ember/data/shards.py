"""Token shards: documents tokenized once into memory-mapped .bin files plus a JSON manifest.

    manifest = build_shards(docs, tok, "runs/x/data/prose", val_fraction=0.02)
    train = TokenShards("runs/x/data/prose", "train")     # np.memmap views, nothing loaded
    train.num_tokens, train.shards[0][:10]

Layout of a shard folder (every file written atomically, the manifest last, so a folder with a
manifest is always complete):

    manifest.json        dtype, vocab size, EOS id, tokenizer + source fingerprints, shard list
    train-00000.bin      raw little-endian uint16 (vocab <= 65536) or uint32 token ids
    val-00000.bin        the held-out documents, same format

Each document is encoded without special tokens and followed by EOS, so packed sequences keep
document boundaries visible to the model. A document is held out for validation when the hash
of its text falls below `val_fraction` (deterministic, order- and machine-independent); if no
document qualifies, the one with the smallest hash is held out so validation is never empty.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ember.atomic import atomic_path, atomic_write_json
from ember.data.sources import DataSourceError, Document
from ember.tokenizer import Tokenizer

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "ember-token-shards/1"
SPLITS = ("train", "val")


def tokenizer_fingerprint(tok: Tokenizer) -> str:
    """A hash of the tokenizer's full definition: shards are valid only for the same one."""
    return hashlib.sha256(tok.backend.to_str().encode()).hexdigest()[:16]


# Share of documents held out for validation unless a run says otherwise (quant's calibration
# and perplexity split of the bundled corpus uses it too, so both agree on what is held out).
VAL_FRACTION = 0.02


def holdout_key(text: str) -> float:
    """A uniform number in [0, 1) from the document's text: below val_fraction means held out."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class _SplitWriter:
    """Appends token arrays to numbered shard files of at most shard_tokens tokens."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.documents = 0
        self._ctx = None
        self._file = None
        self._count = 0

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._ctx = atomic_path(self.folder / name)
        self._file = open(self._ctx.__enter__(), "wb")  # noqa: SIM115 (closed in _close)
        self.shards.append({"file": name, "tokens": 0})
        self._count = 0

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._ctx.__exit__(None, None, None)  # fsync + rename into place
            self._file = self._ctx = None

    def write(self, ids: np.ndarray) -> None:
        self.documents += 1
        while len(ids):
            if self._file is None or self._count >= self.shard_tokens:
                self._close()
                self._open()
            part = ids[: self.shard_tokens - self._count]
            part.tofile(self._file)
            self._count += len(part)
            self.shards[-1]["tokens"] += len(part)
            ids = ids[len(part):]

    def finish(self) -> dict[str, Any]:
        self._close()
        return {"documents": self.documents, "tokens": sum(s["tokens"] for s in self.shards),
                "shards": self.shards}

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)  # removes the temp file
            self._file = self._ctx = None


def _batches(docs: Iterable[Document], max_chars: int = 2_000_000) -> Iterator[list[Document]]:
    batch: list[Document] = []
    size = 0
    for doc in docs:
        batch.append(doc)
        size += len(doc.text)
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def build_shards(docs: Iterable[Document], tok: Tokenizer, folder: str | Path, *,
                 val_fraction: float = VAL_FRACTION, shard_tokens: int = 2**26, source: str = "",
                 show_progress: bool = True) -> dict[str, Any]:
    """Tokenize documents into train/val shards under folder; returns the manifest written.

    `source` is a fingerprint of where the documents came from, stored so callers can tell
    whether existing shards are still current (see `load_manifest`).
    """
    if not 0 <= val_fraction < 1:
        raise DataSourceError(f"val_fraction must be in [0, 1), got {val_fraction}")
    eos = tok.eos_token_id
    if eos is None:
        raise DataSourceError("the tokenizer has no EOS token to separate documents; "
                              "use a tokenizer with eos_token (ember's tokenizers have <|endoftext|>)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).unlink(missing_ok=True)  # the folder is incomplete until the new manifest lands
    dtype = token_dtype(tok.vocab_size)
    writers = {s: _SplitWriter(folder, s, dtype, shard_tokens) for s in SPLITS}
    # The train document with the smallest holdout key waits here, in case no document at all
    # falls into validation and it has to be held out instead.
    pending: tuple[float, np.ndarray] | None = None
    bar = tqdm(desc=f"tokenizing {folder.name}", unit="B", unit_scale=True, disable=not show_progress,
               leave=False)
    try:
        for batch in _batches(docs):
            ids_list = tok.encode_batch([d.text for d in batch], add_special_tokens=False)
            for doc, ids in zip(batch, ids_list):
                arr = np.asarray(ids + [eos], dtype=dtype)
                key = holdout_key(doc.text)
                if key < val_fraction:
                    writers["val"].write(arr)
                elif pending is None or key < pending[0]:
                    if pending is not None:
                        writers["train"].write(pending[1])
                    pending = (key, arr)
                else:
                    writers["train"].write(arr)
            bar.update(sum(len(d.text.encode("utf-8", "surrogatepass")) for d in batch))
        if pending is not None:
            empty_val = writers["val"].documents == 0 and val_fraction > 0
            writers["val" if empty_val else "train"].write(pending[1])
        splits = {s: w.finish() for s, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        bar.close()
    if splits["train"]["tokens"] == 0:
        raise DataSourceError(f"no training text for {folder.name} ({source or 'documents'}): "
                              "the source is empty or every document was held out")
    manifest = {"format": FORMAT, "dtype": dtype.name, "vocab_size": tok.vocab_size, "eos_token_id": eos,
                "tokenizer": tokenizer_fingerprint(tok), "source": source, "val_fraction": val_fraction,
                "splits": splits}
    atomic_write_json(folder / MANIFEST, manifest)
    return manifest


def load_manifest(folder: str | Path) -> dict[str, Any] | None:
    """The manifest of a complete shard folder, or None if there is none (or it is unreadable)."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


@dataclass
class TokenShards:
    """One split of a shard folder as read-only memory maps (opening costs no reads)."""

    folder: Path
    split: str

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)
        manifest = load_manifest(self.folder)
        if manifest is None:
            raise DataSourceError(f"{self.folder} is not a token shard folder (no valid {MANIFEST}); "
                                  "build it with ember.data.shards.build_shards or `ember pretrain`")
        self.manifest = manifest
        self.dtype = np.dtype(manifest["dtype"])
        self.shards: list[np.ndarray] = []
        for entry in manifest["splits"][self.split]["shards"]:
            path = self.folder / entry["file"]
            expected = entry["tokens"] * self.dtype.itemsize
            if not path.exists() or path.stat().st_size != expected:
                raise DataSourceError(f"token shard {path} is missing or has the wrong size "
                                      f"(expected {expected} bytes); delete {self.folder} to rebuild it")
            self.shards.append(np.memmap(path, dtype=self.dtype, mode="r"))

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.shards)
