"""A small real corpus and tokenizer for data and training tests (built in seconds, offline).

    prose, code = write_corpus(tmp_path)      # folders of .txt (pydoc topics) and .py (stdlib)
    tok = small_tokenizer()                   # 512-token byte-level BPE trained on them

and `one_thread`, an autouse fixture the data and training conftests import.
"""

from __future__ import annotations

import functools
import sysconfig
from pathlib import Path

import pytest
import torch

from ember.data.sources import pydoc_topics
from ember.tokenizer import Tokenizer, train_tokenizer

CODE_FILES = ("textwrap.py", "string.py", "calendar.py", "bisect.py", "shlex.py", "glob.py")
PROSE_TOPICS = 40


def prose_texts() -> list[tuple[str, str]]:
    return [(d.source.split(":", 1)[1], d.text) for d in list(pydoc_topics())[:PROSE_TOPICS]]


def code_texts() -> list[tuple[str, str]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [(name, (stdlib / name).read_text(encoding="utf-8")) for name in CODE_FILES]


def write_corpus(root: Path) -> tuple[Path, Path]:
    """Write prose/*.txt and code/*.py under root; returns the two folders."""
    prose, code = root / "prose", root / "code"
    prose.mkdir(parents=True, exist_ok=True)
    code.mkdir(parents=True, exist_ok=True)
    for name, text in prose_texts():
        (prose / f"{name}.txt").write_text(text, encoding="utf-8")
    for name, text in code_texts():
        (code / name).write_text(text, encoding="utf-8")
    return prose, code


@functools.lru_cache(maxsize=1)
def small_tokenizer() -> Tokenizer:
    texts = [t for _, t in prose_texts()] + [t for _, t in code_texts()]
    return train_tokenizer(texts, vocab_size=512, kind="bpe", show_progress=False)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core box: one intra-op thread is several times faster (a second
    thread that is descheduled stalls every small op), and results do not depend on it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
