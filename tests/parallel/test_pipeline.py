"""Micro-batches of a pipeline step: consecutive sequences, about equal tokens, every sequence once."""

from __future__ import annotations

from ember.engine.model_runner import StepInputs
from ember.parallel.pipeline import micro_batches


def _step(lengths: list[int]) -> StepInputs:
    step = StepInputs([])
    for n in lengths:
        step.seqs.append(([0], 0, n))
        step.ids.extend([1] * n)
    return step


def test_decode_step_splits_in_halves() -> None:
    assert micro_batches(_step([1] * 8), 2) == [(0, 4, 0, 4), (4, 8, 4, 8)]


def test_uneven_sequences_cut_near_equal_tokens() -> None:
    assert micro_batches(_step([32, 1, 1, 1, 29]), 2) == [(0, 1, 0, 32), (1, 5, 32, 64)]
    assert micro_batches(_step([10, 10, 10]), 3) == [(0, 1, 0, 10), (1, 2, 10, 20), (2, 3, 20, 30)]


def test_fewer_sequences_than_stages_gives_fewer_micro_batches() -> None:
    assert micro_batches(_step([5]), 4) == [(0, 1, 0, 5)]
