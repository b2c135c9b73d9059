"""Standard errors for evaluation metrics.

    mean_stderr([1, 0, 1, 1])                       # sample std (ddof=1) / sqrt(n), as the harness
    bootstrap_stderr(ratio, [ll, bytes], iters=1000) # std of the statistic over resampled items
    perplexity_stderr(ll, tokens)                    # pooled exp(-sum LL / sum tokens), items resampled
    perplexity_delta_stderr(ll_q, ll_base, tokens)   # percent change between two models, items paired

Means of per-item scores (accuracy, exact match, MC2, judge ratings) use the harness's
`mean_stderr`. Statistics that are not a mean of items, such as corpus perplexity
exp(-sum LL / sum tokens), get a bootstrap over items (documents): the harness reports no
stderr for its weighted perplexities, ember reports this one. A change of perplexity between two
models scored on the same items resamples the items in pairs: both models see the same resample,
so the variation the items share (hard text is hard for both) cancels, as it does in the delta.
All return None when undefined (fewer than two items).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np


def mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def mean_stderr(values: Sequence[float]) -> float | None:
    n = len(values)
    if n < 2:
        return None
    return float(np.std(np.asarray(values, dtype=np.float64), ddof=1) / math.sqrt(n))


def bootstrap_stderr(statistic: Callable[..., np.ndarray], columns: Sequence[Sequence[float]],
                     iters: int = 1000, seed: int = 1234) -> float | None:
    """Std of `statistic` over `iters` resamples (with replacement) of the items.

    `columns` are per-item arrays of equal length; `statistic(*cols)` receives each column
    resampled as an (iters, n) array and must return the iters statistics, reducing axis 1.
    """
    arrays = [np.asarray(c, dtype=np.float64) for c in columns]
    n = len(arrays[0])
    if n < 2:
        return None
    idx = np.random.default_rng(seed).integers(0, n, size=(iters, n))
    stats = statistic(*(a[idx] for a in arrays))
    return float(np.std(stats, ddof=1))


def perplexity_stderr(loglikelihoods: Sequence[float], tokens: Sequence[float], iters: int = 1000,
                      seed: int = 1234) -> float | None:
    """Bootstrap standard error of the pooled perplexity exp(-sum LL / sum tokens) over items."""
    return bootstrap_stderr(lambda ll, n: np.exp(-ll.sum(1) / n.sum(1)), [loglikelihoods, tokens], iters, seed)


def perplexity_delta_stderr(loglikelihoods: Sequence[float], baseline: Sequence[float], tokens: Sequence[float],
                            iters: int = 1000, seed: int = 1234) -> float | None:
    """Bootstrap standard error of 100 * (ppl / baseline ppl - 1), in percent, over paired items.

    Both log-likelihood lists score the same items (same tokens each); the percent change is
    exp(-sum(LL - LL_base) / sum tokens) - 1, so resampling the per-item differences resamples
    the pairs.
    """
    if len(loglikelihoods) != len(baseline):
        raise ValueError(f"paired items differ in number: {len(loglikelihoods)} and {len(baseline)}")
    diff = np.asarray(loglikelihoods, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    return bootstrap_stderr(lambda d, n: 100.0 * np.expm1(-d.sum(1) / n.sum(1)), [diff, tokens], iters, seed)
