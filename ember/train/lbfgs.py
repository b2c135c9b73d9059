"""Batched L-BFGS: many independent small minimisations at once, in float64 torch.

    x = batched_lbfgs(objective, x0)     # x0 (P, k): P starting points of a k-parameter problem

`objective(x, rows)` returns the values (R,) and gradients (R, k) of problems `rows` (a
LongTensor of indices into the P problems) at the points x (R, k). Each problem keeps its own curvature history, step size and
convergence flag, so this is P separate L-BFGS runs (two-loop recursion, backtracking Armijo
line search) evaluated together, and only the problems still running are evaluated. Fitting
a scaling law from thousands of initialisations, or thousands of bootstrap resamples, costs a
few hundred batched evaluations instead of a Python loop of separate fits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Objective = Callable[[torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


def _direction(g: torch.Tensor, S: torch.Tensor, Y: torch.Tensor, rho: torch.Tensor,
               order: list[int], gamma: torch.Tensor) -> torch.Tensor:
    """-H g by the two-loop recursion; pairs with rho == 0 are inert."""
    q = g.clone()
    alphas = {}
    for i in reversed(order):  # newest first
        alphas[i] = rho[:, i] * (S[:, i] * q).sum(-1)
        q -= alphas[i][:, None] * Y[:, i]
    r = gamma[:, None] * q
    for i in order:  # oldest first
        beta = rho[:, i] * (Y[:, i] * r).sum(-1)
        r += S[:, i] * (alphas[i] - beta)[:, None]
    return -r


def _line_search(f: Objective, idx: torch.Tensor, x: torch.Tensor, fx: torch.Tensor, d: torch.Tensor,
                 slope: torch.Tensor, t: torch.Tensor, c1: float, backtracks: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backtracking Armijo per problem from step sizes t.

    Returns (new x, its values, its gradients, accepted mask, final t). At most `backtracks`
    halvings per call: a problem that needs more stays put and starts the next iteration from
    its smaller step, so one hard problem cannot make every iteration of the batch expensive.
    """
    t = t.clone()
    accepted = torch.zeros(len(idx), dtype=torch.bool)
    x_new, f_new, g_new = x.clone(), fx.clone(), torch.zeros_like(x)
    for _ in range(backtracks):
        pending = (~accepted).nonzero().squeeze(1)
        if len(pending) == 0:
            break
        trial = x[pending] + t[pending, None] * d[pending]
        f_trial, g_trial = f(trial, idx[pending])
        ok = torch.isfinite(f_trial) & (f_trial <= fx[pending] + c1 * t[pending] * slope[pending])
        ok &= torch.isfinite(g_trial).all(-1)
        hit = pending[ok]
        x_new[hit], f_new[hit], g_new[hit] = trial[ok], f_trial[ok], g_trial[ok]
        accepted[hit] = True
        t[pending[~ok]] *= 0.5
    return x_new, f_new, g_new, accepted, t


def batched_lbfgs(f: Objective, x0: torch.Tensor, *, max_iter: int = 1000, history: int = 10,
                  gtol: float = 1e-9, ftol: float = 1e-10, c1: float = 1e-4,
                  backtracks: int = 6, min_step: float = 1e-12) -> torch.Tensor:
    """Minimise each row's problem from x0 (P, k); returns the (P, k) minimisers found."""
    x = x0.detach().to(torch.float64).clone()
    P, k = x.shape
    S = torch.zeros(P, history, k, dtype=x.dtype)
    Y = torch.zeros_like(S)
    rho = torch.zeros(P, history, dtype=x.dtype)
    order: list[int] = []  # ring-buffer slots, oldest first
    fx, g = f(x, torch.arange(P))
    gamma = 1.0 / g.abs().amax(-1).clamp_min(1.0)  # a cautious first step
    active = torch.isfinite(fx) & torch.isfinite(g).all(-1)
    restarted = torch.zeros(P, dtype=torch.bool)
    step = torch.ones(P, dtype=x.dtype)  # each problem's last accepted (or tried) step size
    for it in range(max_iter):
        idx = active.nonzero().squeeze(1)
        if len(idx) == 0:
            break
        gi = g[idx]
        d = _direction(gi, S[idx], Y[idx], rho[idx], order, gamma[idx])
        slope = (gi * d).sum(-1)
        bad = ~(slope < 0)  # not a descent direction (or NaN): fall back to steepest descent
        d[bad] = -gi[bad] * gamma[idx][bad, None]
        slope = (gi * d).sum(-1)
        t0 = torch.where(bad, torch.ones_like(slope), (2 * step[idx]).clamp(max=1.0))
        x_new, f_new, g_new, moved, t = _line_search(f, idx, x[idx], fx[idx], d, slope, t0, c1, backtracks)
        step[idx] = t
        failed = ~moved & (t < min_step)  # no decrease even with a vanishing step
        s, y = x_new - x[idx], torch.where(moved[:, None], g_new - gi, torch.zeros_like(gi))
        sy = (s * y).sum(-1)
        yy = (y * y).sum(-1)
        slot = it % history
        if slot in order:
            order.remove(slot)
        order.append(slot)
        good = moved & (sy > 1e-12 * yy)
        S[idx, slot] = torch.where(good[:, None], s, torch.zeros_like(s))
        Y[idx, slot] = torch.where(good[:, None], y, torch.zeros_like(y))
        rho[idx, slot] = torch.where(good, 1.0 / torch.where(good, sy, torch.ones_like(sy)), torch.zeros_like(sy))
        gamma[idx] = torch.where(good, sy / yy.clamp_min(1e-300), gamma[idx])
        rel = (fx[idx] - f_new).abs() / fx[idx].abs().clamp_min(1e-300)
        x[idx] = torch.where(moved[:, None], x_new, x[idx])
        g[idx] = torch.where(moved[:, None], g_new, gi)
        fx[idx] = torch.where(moved, f_new, fx[idx])
        # A failed line search first drops the curvature history (restart from steepest
        # descent); failing again right after means no further progress is possible.
        retry = failed & ~restarted[idx]
        rho[idx[retry]] = 0.0
        gamma[idx[retry]] = 1.0 / g[idx[retry]].abs().amax(-1).clamp_min(1.0)
        step[idx[retry]] = 1.0
        restarted[idx] = retry | (restarted[idx] & ~moved)
        done = (failed & ~retry) | (g[idx].abs().amax(-1) <= gtol) | (moved & (rel < ftol))
        active[idx[done]] = False
    return x
