"""Rejection sampling for speculative decoding: the emitted tokens follow the target exactly.

Given drafts d_1..d_k, drawn from proposal distributions q_1..q_k, and the target's distributions
p_1..p_{k+1} at the k+1 verified positions (p_i conditioned on d_1..d_{i-1}):

    for i = 1..k:   accept d_i with probability min(1, p_i(d_i) / q_i(d_i))
                    on rejection emit a draw from norm(max(0, p_i - q_i)) and stop
    all accepted:   emit a draw from p_{k+1} (the bonus token)

Each emitted token is then distributed as p (Leviathan et al. 2023, Chen et al. 2023). A
deterministic draft (prompt lookup, a greedy draft model) is a point mass, q_i = one-hot(d_i):
accept with probability p_i(d_i), resample from p_i with d_i removed. Greedy requests (argmax
targets) accept the longest prefix of drafts equal to the target's argmax, then emit its argmax.
"""

from __future__ import annotations

import torch


def greedy_accept(target_tokens: list[int], drafts: list[int]) -> list[int]:
    """target_tokens: the argmax at each of the k+1 positions. Accepted drafts + one target token."""
    out: list[int] = []
    for d, t in zip(drafts, target_tokens):
        if d != t:
            break
        out.append(d)
    out.append(target_tokens[len(out)])
    return out


def rejection_sample(target_probs: torch.Tensor, drafts: list[int], draft_probs: torch.Tensor | None,
                     generator: torch.Generator | None) -> list[int]:
    """target_probs (k+1, V); draft_probs (k, V) or None for point-mass drafts. Emitted tokens.

    Returns the accepted drafts followed by one token drawn from the target (a resample after a
    rejection, or the bonus token): between 1 and k+1 tokens.
    """
    k = len(drafts)
    dev = target_probs.device
    idx = torch.arange(k, device=dev)
    d = torch.tensor(drafts, dtype=torch.long, device=dev)
    p = target_probs[idx, d]  # (k,)
    q = torch.ones_like(p) if draft_probs is None else draft_probs[idx, d]
    u = torch.rand(k, generator=generator, device=dev, dtype=target_probs.dtype)
    # u < p/q written as u * q < p: no division by a zero q (never drawn, but rounding)
    ok = (u * q < p).tolist()
    out: list[int] = []
    for i in range(k):
        if not ok[i]:
            residual = target_probs[i].clone()
            if draft_probs is None:
                residual[drafts[i]] = 0
            else:
                residual = (residual - draft_probs[i]).clamp_(min=0)
            if float(residual.sum()) <= 0:  # p <= q everywhere only if p == q: rejection had probability 0
                residual = target_probs[i]
            out.append(_draw(residual, generator))
            return out
        out.append(drafts[i])
    out.append(_draw(target_probs[k], generator))
    return out


def _draw(weights: torch.Tensor, generator: torch.Generator | None) -> int:
    """One index with probability proportional to weights (V,) (unnormalized is fine)."""
    return int(torch.multinomial(weights, 1, generator=generator))
