"""Perplexity of a model over texts by rolling log-likelihood, as lm-evaluation-harness defines it.

Each document is scored whole: its tokens are predicted in windows of at most `max_len`
tokens; the first token is predicted from a prefix token (BOS, else EOS, as the harness does).
With `stride == max_len` the windows are disjoint (the harness's `loglikelihood_rolling`);
a smaller stride gives every later window `max_len - stride` tokens of extra context (the
sliding-window evaluation of the transformers docs). From the summed log-likelihood:

    token perplexity = exp(-LL / tokens)      word perplexity = exp(-LL / words)
    byte perplexity  = exp(-LL / bytes)       bits per byte   = -LL / bytes / ln 2

where words = len(re.split(r"\\s+", text)) and bytes = len(text.encode("utf-8")), summed over
documents (the harness's weighted aggregation).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from ember.eval.loglikelihood import LogitsFn, Span, prefix_token_id, score_spans


def count_words(text: str) -> int:
    return len(re.split(r"\s+", text))


def count_bytes(text: str) -> int:
    return len(text.encode("utf-8"))


@dataclass
class PerplexityResult:
    """Summed log-likelihood with the counts that normalise it."""

    loglikelihood: float = 0.0
    tokens: int = 0
    words: int = 0
    bytes: int = 0
    documents: int = 0

    def add(self, text: str, loglikelihood: float, tokens: int) -> None:
        """Count one document scored as `loglikelihood` over `tokens` tokens."""
        self.loglikelihood += loglikelihood
        self.tokens += tokens
        self.words += count_words(text)
        self.bytes += count_bytes(text)
        self.documents += 1

    @property
    def token_perplexity(self) -> float:
        return math.exp(-self.loglikelihood / max(self.tokens, 1))

    @property
    def word_perplexity(self) -> float:
        return math.exp(-self.loglikelihood / max(self.words, 1))

    @property
    def byte_perplexity(self) -> float:
        return math.exp(-self.loglikelihood / max(self.bytes, 1))

    @property
    def bits_per_byte(self) -> float:
        return -self.loglikelihood / max(self.bytes, 1) / math.log(2)


def rolling_windows(n: int, max_len: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """Windows over seq = [prefix] + ids (len n + 1) that predict every one of the n ids once.

    Each item is (start, end, n_pred): feed seq[start:end] (at most max_len tokens) and score
    its last n_pred predictions, which are ids[end - n_pred : end].
    """
    stride = max_len if stride is None else stride
    if not 0 < stride <= max_len:
        raise ValueError(f"stride must be in 1..max_len ({max_len}), got {stride}")
    windows = []
    done = 0
    while done < n:
        end = min(n, done + (max_len if done == 0 else stride))
        windows.append((max(0, end - max_len), end, end - done))
        done = end
    return windows


def rolling_spans(ids: Sequence[int], prefix_id: int, max_len: int, stride: int | None = None) -> list[Span]:
    """The spans (see ember.eval.loglikelihood) that predict every id of a document once."""
    seq = [prefix_id, *ids]
    windows = rolling_windows(len(ids), max_len, stride)
    return [Span(tuple(seq[start:end + 1]), n_pred) for start, end, n_pred in windows]


def rolling_loglikelihood(logits_fn: LogitsFn, ids: Sequence[int], prefix_id: int, max_len: int,
                          stride: int | None = None, batch_size: int = 8,
                          device: torch.device | str = "cpu") -> float:
    """Sum of log p(ids[i] | prefix, ids[:i]) over the document, scored in rolling windows."""
    spans = rolling_spans(ids, prefix_id, max_len, stride)
    return sum(ll for ll, _ in score_spans(logits_fn, spans, batch_size, device))


def perplexity(logits_fn: LogitsFn, encode: Callable[[str], list[int]], texts: Iterable[str],
               prefix_id: int, max_len: int, stride: int | None = None, batch_size: int = 8,
               device: torch.device | str = "cpu") -> PerplexityResult:
    """Rolling perplexity over documents; empty documents are skipped."""
    result = PerplexityResult()
    for text in texts:
        ids = encode(text)
        if not ids:
            continue
        result.add(text, rolling_loglikelihood(logits_fn, ids, prefix_id, max_len, stride, batch_size, device),
                   len(ids))
    return result


def model_perplexity(model: torch.nn.Module, tokenizer, texts: Iterable[str], max_len: int | None = None,
                     stride: int | None = None, batch_size: int = 8) -> PerplexityResult:
    """Perplexity of an ember model with its tokenizer (windows default to the model's context)."""
    cfg = model.config
    prefix = prefix_token_id(tokenizer)
    device = next(model.parameters()).device
    return perplexity(model, lambda s: tokenizer.encode(s, add_special_tokens=False), texts, prefix,
                      max_len or cfg.max_position_embeddings, stride, batch_size, device)
