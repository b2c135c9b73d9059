"""Multiple choice by log-likelihood, as lm-evaluation-harness's `multiple_choice` output type.

Each item is a context and its choices; the request for choice c is (context, " " + c) (the
harness's target delimiter is a space). From the log-likelihoods:

    acc      = 1 if argmax_i ll_i is the gold choice
    acc_norm = 1 if argmax_i ll_i / len(choice_i) is the gold choice

where len is the choice's length in characters (`completion_len = len(choice)` in the
harness), which makes acc_norm tokenizer-independent. Ties go to the first choice (np.argmax).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ember.eval.backend import Backend

TARGET_DELIMITER = " "


@dataclass(frozen=True)
class ChoiceItem:
    context: str
    choices: tuple[str, ...]


def choice_loglikelihoods(backend: Backend, items: Sequence[ChoiceItem]) -> list[list[float]]:
    """Log-likelihood of every choice of every item, in one batched backend call."""
    requests = [(it.context, TARGET_DELIMITER + c) for it in items for c in it.choices]
    lls = [ll for ll, _ in backend.loglikelihood(requests)]
    out, pos = [], 0
    for it in items:
        out.append(lls[pos:pos + len(it.choices)])
        pos += len(it.choices)
    return out


def acc(lls: Sequence[float], gold: int) -> float:
    return float(int(np.argmax(lls)) == gold)


def acc_norm(lls: Sequence[float], choices: Sequence[str], gold: int) -> float:
    lengths = np.array([float(len(c)) for c in choices])
    return float(int(np.argmax(np.asarray(lls) / lengths)) == gold)
