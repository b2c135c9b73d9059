"""The quickstart's evaluation report: every model it built or met, measured one way, in one table.

    heldout = HeldOut.bundled(max_doc_bytes=8_000, window=128)
    rows = {"pretrained": HeldOutRow("quickstart BPE 8192", heldout.measure(model, tok)), ...}
    print(lifecycle_report(rows, heldout, {"dpo": dpo_dir, "smollm2": smollm2_backend}))

Every perplexity in the table comes from `HeldOut.measure`: ember.eval.perplexity's rolling
log-likelihood over the same texts (the bundled corpus's held-out split, which pretraining,
calibration and fine-tuning never see) with the same disjoint window. Models with different
tokenizers predict different units, so token perplexity compares rows only within one
tokenizer; bits per byte (the same log-likelihood over the text's UTF-8 bytes) compares them all.
The models named in `models` also answer the bundled MMLU-style sample (acc and acc_norm with
standard errors); one that no stage measured is measured here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ember.atomic import atomic_write_text
from ember.eval.datafile import sample_data
from ember.eval.local_backend import LocalBackend
from ember.eval.perplexity import PerplexityResult, model_perplexity
from ember.eval.tasks import TaskOptions, run_task


def _head(text: str, max_bytes: int | None) -> str:
    """The text cut to at most max_bytes UTF-8 bytes, at a line end where there is one."""
    if max_bytes is None or len(text.encode("utf-8")) <= max_bytes:
        return text
    cut = text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
    return cut[:cut.rfind("\n") + 1] or cut


@dataclass(frozen=True)
class HeldOut:
    """One held-out text set and one window length: the only way the report measures perplexity."""

    texts: tuple[str, ...]
    window: int

    @classmethod
    def bundled(cls, max_doc_bytes: int | None, window: int) -> HeldOut:
        """The bundled corpus's held-out documents (ember.data.shards' 2 % split by text hash, which
        every pretraining split with val_fraction >= 2 % also holds out), each cut to max_doc_bytes."""
        from ember.quant.calibration import split_documents

        texts = tuple(_head(d.text, max_doc_bytes) for d in split_documents(["bundled"], held_out=True))
        return cls(texts, window)

    @property
    def bytes(self) -> int:
        return sum(len(t.encode("utf-8")) for t in self.texts)

    def measure(self, model: torch.nn.Module, tokenizer) -> PerplexityResult:
        with torch.no_grad():
            return model_perplexity(model, tokenizer, self.texts, max_len=self.window)

    def write(self, path: Path) -> Path:
        """The texts as jsonl, for a verb's --eval-data (ember quantize measures them the same way)."""
        atomic_write_text(path, "".join(json.dumps({"text": t}) + "\n" for t in self.texts))
        return path

    def describe(self) -> str:
        return (f"{len(self.texts)} held-out documents of the bundled corpus, {self.bytes:,} bytes; "
                f"disjoint windows of {self.window} tokens")


@dataclass
class HeldOutRow:
    """A model's held-out result and the tokenizer whose tokens its token perplexity counts."""

    tokenizer: str
    result: PerplexityResult


def _backend(model: Path | LocalBackend) -> LocalBackend:
    return model if isinstance(model, LocalBackend) else LocalBackend.from_dir(model)


def lifecycle_report(rows: dict[str, HeldOutRow], heldout: HeldOut,
                     models: dict[str, Path | LocalBackend]) -> str:
    """Measure the `models` no stage measured (adding them to `rows`), run the MMLU sample on
    `models`, and return the table: one line per row, in the order the stages recorded them."""
    mmlu: dict[str, dict[str, str]] = {}
    n_questions = 0
    for name, model in models.items():
        backend = _backend(model)
        if name not in rows:
            rows[name] = HeldOutRow(f"{type(backend.tokenizer).__name__} {backend.tokenizer.vocab_size}",
                                    heldout.measure(backend.model, backend.tokenizer))
        result = run_task("mmlu", backend, sample_data("mmlu"), TaskOptions())
        mmlu[name] = {m.metric: f"{m.value:.3f} ± {m.stderr:.3f}" for m in result.metrics}
        n_questions = max(m.n for m in result.metrics)
    head = ["model", "tokenizer", "bits/byte", "byte ppl", "token ppl", "tokens", "mmlu acc", "mmlu acc_norm"]
    body = [[name, r.tokenizer, f"{r.result.bits_per_byte:.4f}", f"{r.result.byte_perplexity:.4f}",
             f"{r.result.token_perplexity:.2f}", f"{r.result.tokens:,}",
             mmlu.get(name, {}).get("acc", "-"), mmlu.get(name, {}).get("acc_norm", "-")] for name, r in rows.items()]
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]

    def line(cells: list[str]) -> str:  # names left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    tokenizers = sorted({r.tokenizer for r in rows.values()})
    notes = [f"held-out set: {heldout.describe()}; one function (ember.eval.perplexity.model_perplexity) for every row."]
    if len(tokenizers) > 1:
        notes.append(f"bits/byte and byte ppl compare every row; token ppl only rows of one tokenizer "
                     f"({' vs '.join(tokenizers)} count different tokens).")
    if mmlu:
        notes.append(f"mmlu: the bundled MMLU-style sample, {n_questions} questions (± standard error).")
    return "\n".join([line(head), "  ".join("-" * w for w in widths), *map(line, body), *notes])
