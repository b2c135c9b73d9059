"""Rejection sampling keeps the target's distribution exactly (chi-square over many draws), for
point-mass drafts (prompt lookup) and for drafts drawn from another distribution (a draft model);
a sampler that accepts every draft fails the same test."""

from __future__ import annotations

import torch
from scipy.stats import chisquare

from ember.engine.spec_decode.rejection import greedy_accept, rejection_sample

V, DRAWS = 6, 20000


def _target() -> torch.Tensor:
    return torch.tensor([[0.30, 0.25, 0.20, 0.15, 0.07, 0.03],
                         [0.05, 0.10, 0.40, 0.05, 0.30, 0.10],
                         [0.20, 0.20, 0.20, 0.20, 0.10, 0.10]], dtype=torch.float64)


def _first_tokens(sample) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(V)
    for _ in range(DRAWS):
        counts[sample(g)[0]] += 1
    return counts


def _p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    return float(chisquare(counts.numpy(), (probs * counts.sum()).numpy()).pvalue)


def test_point_mass_drafts_keep_the_target() -> None:
    p = _target()
    for draft in (0, 4, 5):  # a likely draft, an unlikely one, a rare one
        counts = _first_tokens(lambda g: rejection_sample(p, [draft, 1], None, g))
        assert _p_value(counts, p[0]) > 1e-3, (draft, counts)


def test_sampled_drafts_keep_the_target() -> None:
    p = _target()
    q = torch.tensor([[0.05, 0.05, 0.10, 0.10, 0.30, 0.40],
                      [0.30, 0.20, 0.10, 0.10, 0.20, 0.10]], dtype=torch.float64)

    def sample(g: torch.Generator) -> list[int]:
        drafts = [int(torch.multinomial(q[i], 1, generator=g)) for i in range(2)]
        return rejection_sample(p, drafts, q, g)

    counts = _first_tokens(sample)
    assert _p_value(counts, p[0]) > 1e-3, counts


def test_second_token_follows_the_target_given_the_first() -> None:
    """When the first draft is accepted, the next emitted token is distributed as p_2."""
    p = _target()
    g = torch.Generator().manual_seed(1)
    counts = torch.zeros(V)
    for _ in range(DRAWS):
        out = rejection_sample(p, [0, 3], None, g)
        if len(out) >= 2:
            counts[out[1]] += 1
    assert _p_value(counts, p[1]) > 1e-3, counts


def test_the_test_catches_a_biased_sampler() -> None:
    p = _target()
    counts = _first_tokens(lambda g: [4])  # "accept the draft always"
    assert _p_value(counts, p[0]) < 1e-3
    naive = _first_tokens(lambda g: [4] if torch.rand(1, generator=g) < 0.5 else rejection_sample(p, [4], None, g))
    assert _p_value(naive, p[0]) < 1e-3


def test_greedy_accepts_the_longest_agreeing_prefix() -> None:
    assert greedy_accept([3, 4, 5, 6], [3, 4, 9]) == [3, 4, 5]
    assert greedy_accept([3, 4, 5, 6], [3, 4, 5]) == [3, 4, 5, 6]
    assert greedy_accept([3, 4], [7]) == [3]
