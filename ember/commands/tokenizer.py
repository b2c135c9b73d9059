"""Train a byte-level tokenizer (BPE or Unigram), or encode text with one.

    ember tokenizer train --data bundled --vocab-size 8192 --out runs/tok
    ember tokenizer train --data notes/ corpus.jsonl --kind unigram --vocab-size 16000 --out runs/tok
    ember tokenizer encode --tokenizer runs/tok --text "def f(x): return x"
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ember.data.sources import documents
from ember.tokenizer import load_tokenizer, train_tokenizer

log = logging.getLogger(__name__)


@dataclass
class TrainTokenizerConfig:
    """Train a byte-level tokenizer (no <unk> ever) with ember's special tokens and chat template."""

    out: Path = field(metadata={"help": "output folder (tokenizer.json, tokenizer_config.json)"})
    data: list[str] = field(default_factory=lambda: ["bundled"], metadata={
        "help": "files/folders (.txt .md .rst .py .jsonl); 'bundled' = Python docs + stdlib code"})
    vocab_size: int = field(default=8192, metadata={"help": "vocabulary size, special tokens included"})
    kind: Literal["bpe", "unigram"] = field(default="bpe", metadata={"help": "tokenization model"})
    text_field: str = field(default="text", metadata={"help": "jsonl field holding the text"})
    code_bytes: int = field(default=4_000_000, metadata={"help": "bytes of stdlib code in 'bundled'"})


@dataclass
class EncodeConfig:
    """Print the token ids (and pieces) of a text."""

    tokenizer: Path = field(metadata={"help": "tokenizer folder"})
    text: str = field(metadata={"help": "text to encode"})


def train(cfg: TrainTokenizerConfig) -> None:
    texts = (doc.text for doc in documents(cfg.data, cfg.text_field, cfg.code_bytes))
    tok = train_tokenizer(texts, vocab_size=cfg.vocab_size, kind=cfg.kind)
    tok.save(cfg.out)
    print(f"trained a {cfg.kind} tokenizer with {tok.vocab_size} tokens -> {cfg.out}")


def encode(cfg: EncodeConfig) -> None:
    tok = load_tokenizer(cfg.tokenizer)
    ids = tok.encode(cfg.text)
    print(ids)
    print(tok.convert_ids_to_tokens(ids))


SUBCOMMANDS = {"train": (TrainTokenizerConfig, train), "encode": (EncodeConfig, encode)}
