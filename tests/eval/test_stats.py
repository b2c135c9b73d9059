"""Standard errors: the harness's mean stderr, the bootstrap used for pooled ratios, and perplexity's."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ember.eval.stats import (
    bootstrap_stderr,
    mean_stderr,
    perplexity_delta_stderr,
    perplexity_stderr,
)


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


def test_perplexity_stderr_matches_the_delta_method() -> None:
    # k windows of n tokens: ppl = exp(-mean(ll) / n); for a small spread the delta method gives
    # SE ~= ppl * sd(ll / n) / sqrt(k) (plug-in sd, as the bootstrap's).
    rng = np.random.default_rng(0)
    k, n = 400, 128
    ll = -n * rng.uniform(2.0, 2.4, size=k)
    tokens = np.full(k, n)
    ppl = math.exp(-ll.sum() / tokens.sum())
    expected = ppl * (ll / n).std() / math.sqrt(k)
    assert perplexity_stderr(ll, tokens, iters=4000) == pytest.approx(expected, rel=0.06)
    assert perplexity_stderr([-5.0], [3]) is None


def test_perplexity_delta_stderr_pairs_the_windows() -> None:
    rng = np.random.default_rng(1)
    k, n = 300, 64
    base = -n * rng.uniform(1.0, 4.0, size=k)  # windows of very different difficulty
    tokens = np.full(k, n)
    shifted = base - 0.01 * n  # every window 0.01 nats/token worse: the change is exactly exp(0.01) - 1
    assert perplexity_delta_stderr(shifted, base, tokens) == pytest.approx(0.0, abs=1e-9)
    # Unpaired, the windows' spread alone (~5 % of the perplexity) would swamp the 1 % change.
    ppl = math.exp(-shifted.sum() / tokens.sum())
    assert 100 * perplexity_stderr(shifted, tokens) / ppl > 3 * 100 * math.expm1(0.01)
    # Independent per-window differences: SE ~= 100 * exp(-mean d / n) * sd(d / n) / sqrt(k).
    d = n * rng.normal(0.0, 0.05, size=k)
    expected = 100 * math.exp(-d.sum() / tokens.sum()) * (d / n).std() / math.sqrt(k)
    assert perplexity_delta_stderr(base + d, base, tokens, iters=4000) == pytest.approx(expected, rel=0.06)
    with pytest.raises(ValueError, match="paired"):
        perplexity_delta_stderr([1.0, 2.0], [1.0], [1, 1])
