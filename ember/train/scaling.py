"""Scaling laws: fit L(N, D) = E + A/N^α + B/D^β and plan compute-optimal model and data sizes.

    points = read_points("runs/sweep/results.csv")       # or Epoch's chinchilla_fig4_epoch.csv
    fit = fit_law(points.N, points.D, points.L)            # Chinchilla Approach 3
    cis = bootstrap(points, fit.law, resamples=1000)       # {"E": (lo, hi), ...}
    n, d = PUBLISHED["epoch"].optimal(5.76e23)             # ≈ 72e9 parameters, 1.3e12 tokens

The fit is Hoffmann et al.'s Approach 3 as Besiroglu et al. (Epoch AI, 2024) replicated it:
minimise the summed Huber loss (δ = 1e-3) between log L and
    log L̂ = LSE(a − α log N, b − β log D, e),   A = exp a, B = exp b, E = exp e
with L-BFGS from Hoffmann's grid of initialisations (α, β ∈ {0, .5, …, 2}, e ∈ {−1, −.5, …, 1},
a, b ∈ {0, 5, …, 25}), keeping the best. Confidence intervals come from refitting on bootstrap
resamples of the points. All fits run together in one batched L-BFGS (ember/train/lbfgs.py).

Compute-optimal allocation under C ≈ 6ND (minimise L subject to the budget):
    N_opt = G (C/6)^(β/(α+β)),  D_opt = (C/6) / N_opt,  G = (αA / (βB))^(1/(α+β))
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ember.errors import EmberError
from ember.train.lbfgs import batched_lbfgs

PARAMS = ("E", "A", "B", "alpha", "beta")


class ScalingError(EmberError):
    """A scaling-law input that cannot be used (bad CSV, unknown law, bad budget)."""


@dataclass(frozen=True)
class ScalingLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, n, d):
        return self.E + self.A / np.power(n, self.alpha) + self.B / np.power(d, self.beta)

    def optimal(self, flops: float) -> tuple[float, float]:
        """(N, D) minimising the loss at C = 6 N D."""
        if not 0 < flops < float("inf"):  # also refuses nan, and 1e999 (read as inf)
            raise ScalingError(f"the compute budget must be positive and finite, got {flops}")
        a, b = self.alpha, self.beta
        g = (a * self.A / (b * self.B)) ** (1 / (a + b))
        n = g * (flops / 6) ** (b / (a + b))
        return n, flops / (6 * n)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


PUBLISHED = {
    # Hoffmann et al. 2022, Approach 3 (as printed in the paper).
    "chinchilla": ScalingLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28),
    # Besiroglu et al. 2024 (Epoch AI), refit on data read from Chinchilla's Figure 4.
    "epoch": ScalingLaw(E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658),
}


def load_law(name_or_path: str) -> ScalingLaw:
    """A published law by name, or one saved by `ember scaling fit --out FIT.json`."""
    if name_or_path in PUBLISHED:
        return PUBLISHED[name_or_path]
    path = Path(name_or_path)
    if not path.exists():
        raise ScalingError(f"--law {name_or_path!r} is neither a published law ({', '.join(PUBLISHED)}) "
                           "nor an existing fit file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        data = data.get("law", data)
        return ScalingLaw(**{k: float(data[k]) for k in PARAMS})
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ScalingError(f"{path} is not a scaling-law fit (expected JSON with {', '.join(PARAMS)})") from None


# ---- data -------------------------------------------------------------------------------------
_ALIASES = {
    "N": ("params", "parameters", "n", "model size", "model_size", "num_params", "non_embedding_params"),
    "D": ("tokens", "d", "training tokens", "training_tokens", "num_tokens", "data"),
    "C": ("flops", "c", "compute", "training flop", "training flops", "training_flop", "training_flops"),
    "L": ("loss", "l", "final loss", "final_loss", "val_loss"),
}


@dataclass
class Points:
    """Training runs: parameters N, tokens D and final loss L (numpy float64 arrays)."""

    N: np.ndarray
    D: np.ndarray
    L: np.ndarray

    def __len__(self) -> int:
        return len(self.L)


def read_points(path: str | Path, drop_highest_loss: int = 0) -> Points:
    """Read (N, D or C, L) columns from a CSV; D = C / 6N when only compute is given."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise ScalingError(f"data file {path} does not exist") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise ScalingError(f"data file {path} is not a UTF-8 CSV file ({type(e).__name__})") from None
    if not rows:
        raise ScalingError(f"{path} has no data rows")
    header = {h.strip().lower(): h for h in rows[0] if h is not None}

    def column(key: str) -> str | None:
        return next((header[a] for a in _ALIASES[key] if a in header), None)

    cols = {k: column(k) for k in _ALIASES}
    for key, what in (("N", "parameter"), ("L", "loss")):
        if cols[key] is None:
            raise ScalingError(f"{path} has no {what} column (looked for: {', '.join(_ALIASES[key])})")
    if cols["D"] is None and cols["C"] is None:
        raise ScalingError(f"{path} needs a tokens or a FLOPs column "
                           f"(looked for: {', '.join(_ALIASES['D'] + _ALIASES['C'])})")
    try:
        n = np.array([float(r[cols["N"]]) for r in rows])
        loss = np.array([float(r[cols["L"]]) for r in rows])
        d = (np.array([float(r[cols["D"]]) for r in rows]) if cols["D"]
             else np.array([float(r[cols["C"]]) for r in rows]) / (6 * n))
    except (TypeError, ValueError) as e:
        raise ScalingError(f"{path}: a value is not a number ({e})") from None
    if not (np.all(n > 0) and np.all(d > 0) and np.all(loss > 0)):
        raise ScalingError(f"{path}: parameters, tokens and losses must all be positive")
    keep = np.argsort(loss, kind="stable")[: len(loss) - drop_highest_loss] if drop_highest_loss else slice(None)
    if drop_highest_loss:
        keep = np.sort(keep)
    pts = Points(n[keep], d[keep], loss[keep])
    if len(pts) < len(PARAMS):
        raise ScalingError(f"{path}: {len(pts)} points cannot determine the {len(PARAMS)} parameters of L(N, D)")
    return pts


# ---- fitting ----------------------------------------------------------------------------------
def huber(r: torch.Tensor, delta: float) -> torch.Tensor:
    a = r.abs()
    return torch.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def _objective(points: Points, weights: torch.Tensor | None, delta: float):
    """Summed Huber loss of problems `rows` at theta (R, 5) = (a, b, e, alpha, beta), and its gradient.

    weights (P, n) are per-problem point multiplicities (bootstrap counts); None: all ones.
    The gradient is analytic: d log L̂ / d(a, b, e) are the softmax weights of the three terms.
    """
    log_n = torch.tensor(np.log(points.N), dtype=torch.float64)
    log_d = torch.tensor(np.log(points.D), dtype=torch.float64)
    log_l = torch.tensor(np.log(points.L), dtype=torch.float64)

    def f(theta: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b, e, alpha, beta = (theta[:, i:i + 1] for i in range(5))
        terms = torch.stack([a - alpha * log_n, b - beta * log_d, e.expand(-1, len(log_n))])  # (3, R, n)
        pred = torch.logsumexp(terms, dim=0)
        r = pred - log_l
        w = 1.0 if weights is None else weights[rows]
        value = (w * huber(r, delta)).sum(-1)
        dr = w * r.clamp(-delta, delta)  # Huber'(r), weighted
        soft = torch.exp(terms - pred)  # (3, R, n)
        grad = torch.stack([(dr * soft[0]).sum(-1), (dr * soft[1]).sum(-1), (dr * soft[2]).sum(-1),
                            -(dr * soft[0] * log_n).sum(-1), -(dr * soft[1] * log_d).sum(-1)], dim=-1)
        return value, grad

    return f


def hoffmann_grid() -> torch.Tensor:
    """Hoffmann et al.'s 4,500 initialisations as (a, b, e, alpha, beta) rows."""
    alphas = np.arange(0, 2.01, 0.5)
    es = np.arange(-1, 1.01, 0.5)
    abs_ = np.arange(0, 26, 5)
    rows = [(a, b, e, al, be) for al, be, e, a, b in itertools.product(alphas, alphas, es, abs_, abs_)]
    return torch.tensor(rows, dtype=torch.float64)


def _law(theta: torch.Tensor) -> ScalingLaw:
    a, b, e, alpha, beta = (float(v) for v in theta)
    return ScalingLaw(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta)


def _theta(law: ScalingLaw) -> list[float]:
    return [math.log(law.A), math.log(law.B), math.log(law.E), law.alpha, law.beta]


@dataclass
class Fit:
    law: ScalingLaw
    objective: float  # summed Huber loss at the optimum
    points: int


@contextlib.contextmanager
def _one_thread():
    """Run on one thread: these are thousands of tiny ops, where thread hand-offs cost more
    than they save (and on a busy machine a descheduled second thread stalls every op)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit_law(points: Points, delta: float = 1e-3, init: torch.Tensor | None = None, starts: int = 128) -> Fit:
    """Chinchilla Approach 3: the best of L-BFGS runs from a grid of initialisations.

    init: starting points (default Hoffmann's 4,500-point grid); L-BFGS runs from the `starts`
    of them with the lowest objective (0: from all of them).
    """
    init = hoffmann_grid() if init is None else init
    f = _objective(points, None, delta)
    with _one_thread():
        if 0 < starts < len(init):
            v0, _ = f(init, torch.arange(len(init)))
            init = init[torch.argsort(torch.nan_to_num(v0, nan=float("inf")))[:starts]]
        theta = batched_lbfgs(f, init)
        values, _ = f(theta, torch.arange(len(theta)))
    values = torch.where(torch.isfinite(values), values, torch.full_like(values, float("inf")))
    best = int(torch.argmin(values))
    return Fit(_law(theta[best]), float(values[best]), len(points))


def bootstrap(points: Points, law: ScalingLaw, resamples: int = 1000, delta: float = 1e-3, seed: int = 0,
              level: float = 0.95) -> dict[str, tuple[float, float, float]]:
    """Per parameter: (low, high) percentile interval at `level` and the bootstrap standard error.

    Each resample draws len(points) points with replacement (as counts) and is refitted from the
    full-data optimum.
    """
    rng = np.random.default_rng(seed)
    n = len(points)
    counts = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(resamples)])
    weights = torch.tensor(counts, dtype=torch.float64)
    init = torch.tensor([_theta(law)], dtype=torch.float64).expand(resamples, -1)
    with _one_thread():
        theta = batched_lbfgs(_objective(points, weights, delta), init)
    laws = np.array([[getattr(_law(t), p) for p in PARAMS] for t in theta])
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(laws, [tail, 100 - tail], axis=0)
    se = laws.std(axis=0, ddof=1)
    return {p: (float(lo[i]), float(hi[i]), float(se[i])) for i, p in enumerate(PARAMS)}


# ---- plot -------------------------------------------------------------------------------------
def plot_fit(points: Points, law: ScalingLaw, png: str | Path) -> Path | None:
    """Left: loss against parameters with iso-FLOP curves of the law through the data's budgets and
    their minima; right: the compute-optimal frontier N_opt(C) with the data. None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from ember.atomic import atomic_write

    flops = 6 * points.N * points.D
    budgets = np.unique(np.round(np.log10(flops) * 2) / 2)  # the data's budgets, half-decade bins
    cmap = plt.get_cmap("viridis")
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4), dpi=110)
    colors = (np.log10(flops) - budgets.min()) / max(1e-9, np.ptp(budgets))
    left.scatter(points.N, points.L, c=cmap(colors), s=10, alpha=0.7, label="runs")
    n_grid = np.logspace(np.log10(points.N.min()) - 0.5, np.log10(points.N.max()) + 0.5, 200)
    for lb in budgets:
        c = 10**lb
        color = cmap((lb - budgets.min()) / max(1e-9, np.ptp(budgets)))
        left.plot(n_grid, law.loss(n_grid, c / (6 * n_grid)), color=color, lw=1)
        n_opt, d_opt = law.optimal(c)
        left.plot([n_opt], [law.loss(n_opt, d_opt)], "k*", ms=6)
    left.set(xscale="log", xlabel="parameters N", ylabel="loss", title="iso-FLOP curves (★ optimum)")
    left.set_ylim(points.L.min() * 0.95, points.L.max() * 1.05)
    c_grid = np.logspace(np.log10(flops.min()), np.log10(flops.max()) + 2, 100)
    right.plot(c_grid, [law.optimal(c)[0] for c in c_grid], "k-", label="compute-optimal N")
    right.scatter(flops, points.N, c=cmap(colors), s=10, alpha=0.7, label="runs")
    right.set(xscale="log", yscale="log", xlabel="training FLOPs C = 6ND", ylabel="parameters N",
              title=f"frontier: E={law.E:.3g} A={law.A:.4g} B={law.B:.4g} α={law.alpha:.3f} β={law.beta:.3f}")
    right.legend()
    fig.tight_layout()
    atomic_write(png, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return Path(png)
