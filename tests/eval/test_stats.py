"""Standard errors: the harness's mean stderr, and the bootstrap used for pooled ratios."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ember.eval.stats import bootstrap_stderr, mean_stderr


def test_mean_stderr_by_hand() -> None:
    # mean 0.75; sample variance (3 * 0.0625 + 0.5625) / 3 = 0.25; stderr sqrt(0.25) / sqrt(4) = 0.25
    assert mean_stderr([1, 0, 1, 1]) == pytest.approx(0.25)
    assert mean_stderr([5.0]) is None


def test_bootstrap_of_a_mean_matches_the_analytic_stderr() -> None:
    values = np.arange(200, dtype=float)
    boot = bootstrap_stderr(lambda v: v.mean(1), [values], iters=2000)
    analytic = values.std() / math.sqrt(len(values))  # the bootstrap's plug-in estimate
    assert boot == pytest.approx(analytic, rel=0.05)
    assert boot == bootstrap_stderr(lambda v: v.mean(1), [values], iters=2000)  # seeded: reproducible
    assert bootstrap_stderr(lambda v: v.mean(1), [[1.0]]) is None
