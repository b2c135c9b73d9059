"""Scaling laws: sweep small runs, fit L(N, D) = E + A/N^α + B/D^β, plan compute-optimal N and D.

    ember scaling sweep --tokenizer runs/tok --models 2x64 4x128 --tokens 1e5 1e6 --out runs/scaling
    ember scaling fit --data runs/scaling/results.csv --plot runs/scaling/fit.png --out runs/scaling/fit.json
    ember scaling fit --data chinchilla_fig4_epoch.csv --drop-highest-loss 5      # Epoch AI's replication
    ember scaling plan --flops 5.76e23 --law epoch          # or chinchilla, or a FIT.json from `fit --out`
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ember.atomic import atomic_write_json
from ember.train.scaling import PARAMS, PUBLISHED, bootstrap, fit_law, load_law, plot_fit, read_points
from ember.train.sweep import SweepConfig, sweep


@dataclass
class FitConfig:
    """Fit L(N, D) by Huber loss on log-loss with L-BFGS from a grid (Chinchilla Approach 3)."""

    data: Path = field(metadata={"help": "CSV with parameter, token or FLOP, and loss columns "
                                         "(e.g. params,tokens,loss or Epoch's 'Model Size','Training FLOP',loss)"})
    drop_highest_loss: int = field(default=0, metadata={"help": "leave out this many highest-loss points "
                                                                "(Epoch drops 5 from Chinchilla's data)"})
    delta: float = field(default=1e-3, metadata={"help": "Huber delta"})
    starts: int = field(default=128, metadata={"help": "L-BFGS runs from the best N grid points (0: all 4,500)"})
    bootstrap: int = field(default=1000, metadata={"help": "bootstrap resamples for the intervals (0: none)"})
    seed: int = field(default=0, metadata={"help": "bootstrap seed"})
    out: Path | None = field(default=None, metadata={"help": "write the fit as JSON (for `plan --law`)"})
    plot: Path | None = field(default=None, metadata={"help": "write a PNG of the data, iso-FLOP curves and frontier"})
    json: bool = field(default=False, metadata={"help": "print JSON instead of a table"})


@dataclass
class PlanConfig:
    """Compute-optimal parameters and tokens for a FLOP budget (C ≈ 6ND)."""

    flops: float = field(metadata={"help": "training compute budget in FLOPs, e.g. 5.76e23"})
    law: str = field(default="epoch", metadata={"help": f"{', '.join(PUBLISHED)}, or a FIT.json from `fit --out`"})
    json: bool = field(default=False, metadata={"help": "print JSON"})


def fit(cfg: FitConfig) -> dict:
    points = read_points(cfg.data, cfg.drop_highest_loss)
    result = fit_law(points, cfg.delta, starts=cfg.starts)
    law = result.law
    intervals = bootstrap(points, law, cfg.bootstrap, cfg.delta, cfg.seed) if cfg.bootstrap > 1 else {}
    report = {"law": law.to_dict(), "points": len(points), "huber_objective": result.objective,
              "intervals_95": {k: list(v[:2]) for k, v in intervals.items()},
              "standard_errors": {k: v[2] for k, v in intervals.items()}, "source": str(cfg.data)}
    if cfg.out:
        atomic_write_json(cfg.out, report)
    if cfg.plot:
        plot_fit(points, law, cfg.plot)
    if cfg.json:
        print(json.dumps(report, indent=2))
        return report
    print(f"L(N, D) = E + A/N^alpha + B/D^beta fitted to {len(points)} points of {cfg.data}")
    print(f"{'':6} {'estimate':>12} {'95% interval':>26} {'std err':>10}")
    for k in PARAMS:
        v = getattr(law, k)
        if k in intervals:
            lo, hi, se = intervals[k]
            print(f"{k:6} {v:12.5g} {f'({lo:.4g}, {hi:.4g})':>26} {se:10.3g}")
        else:
            print(f"{k:6} {v:12.5g}")
    return report


def plan(cfg: PlanConfig) -> dict:
    law = load_law(cfg.law)
    n, d = law.optimal(cfg.flops)
    report = {"flops": cfg.flops, "law": cfg.law, "params": n, "tokens": d, "tokens_per_param": d / n,
              "loss": float(law.loss(n, d))}
    if cfg.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"C = {cfg.flops:.3g} FLOPs under the {cfg.law} law: N = {n / 1e9:.3g}B parameters, "
              f"D = {d / 1e12:.3g}T tokens ({d / n:.1f} tokens/parameter), predicted loss {report['loss']:.3f}")
    return report


def run_sweep(cfg: SweepConfig) -> None:
    results = sweep(cfg)
    print(f"results in {results}; fit them with: ember scaling fit --data {results}")


SUBCOMMANDS = {"sweep": (SweepConfig, run_sweep), "fit": (FitConfig, fit), "plan": (PlanConfig, plan)}
