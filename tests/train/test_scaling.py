"""Scaling laws: Epoch AI's refit of Chinchilla's data, the compute-optimal planner, a tiny sweep."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from ember.commands.scaling import FitConfig, PlanConfig, fit, plan
from ember.train.scaling import PUBLISHED, Points, ScalingError, ScalingLaw, fit_law, load_law, read_points
from ember.train.sweep import SweepConfig, sweep

EPOCH_CSV = Path(__file__).with_name("data") / "chinchilla_fig4_epoch.csv"  # source: data/README.md


def test_fit_recovers_epochs_published_law(tmp_path) -> None:
    report = fit(FitConfig(data=EPOCH_CSV, drop_highest_loss=5, bootstrap=300, json=True,
                           out=tmp_path / "fit.json", plot=tmp_path / "fit.png"))
    assert report["points"] == 240
    law, ci = report["law"], report["intervals_95"]
    epoch = PUBLISHED["epoch"]
    # Besiroglu et al. 2024: E 1.82, A 482, B 2085, alpha 0.348, beta 0.366.
    assert law["E"] == pytest.approx(epoch.E, rel=0.01)
    assert law["alpha"] == pytest.approx(epoch.alpha, abs=0.005)
    assert law["beta"] == pytest.approx(epoch.beta, abs=0.005)
    assert law["A"] == pytest.approx(epoch.A, rel=0.05)
    assert law["B"] == pytest.approx(epoch.B, rel=0.08)
    for k, (lo, hi) in ci.items():  # their estimates lie inside our bootstrap intervals
        assert lo < getattr(epoch, k) < hi, k
    assert (tmp_path / "fit.png").stat().st_size > 10_000
    assert load_law(str(tmp_path / "fit.json")).alpha == law["alpha"]


def test_plan_matches_chinchilla_scale() -> None:
    report = plan(PlanConfig(flops=5.76e23, law="epoch", json=True))
    assert report["params"] == pytest.approx(72e9, rel=0.02)  # Chinchilla itself: 70B / 1.4T
    assert report["tokens"] == pytest.approx(1.33e12, rel=0.02)
    # It is the minimum of the loss along the budget: every other split is worse.
    law, c = PUBLISHED["epoch"], 5.76e23
    n = np.array([0.8, 0.95, 1.05, 1.25]) * report["params"]
    assert np.all(law.loss(n, c / (6 * n)) > report["loss"])


def test_fit_recovers_a_known_law_from_noisy_points() -> None:
    truth = ScalingLaw(E=2.1, A=300.0, B=900.0, alpha=0.31, beta=0.29)
    rng = np.random.default_rng(0)
    n = 10 ** rng.uniform(6, 9, 150)
    d = 10 ** rng.uniform(8, 11, 150)
    loss = truth.loss(n, d) * np.exp(rng.normal(0, 0.002, 150))
    got = fit_law(Points(n, d, loss)).law
    assert got.E == pytest.approx(truth.E, rel=0.02) and got.alpha == pytest.approx(truth.alpha, abs=0.02)
    assert got.beta == pytest.approx(truth.beta, abs=0.02)
    assert got.optimal(1e21)[0] == pytest.approx(truth.optimal(1e21)[0], rel=0.15)


def test_bad_inputs_are_clear_errors(tmp_path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("size,loss\n1e6,3.0\n")
    with pytest.raises(ScalingError, match="no parameter column"):
        read_points(bad)
    bad.write_text("params,loss\n1e6,3.0\n")
    with pytest.raises(ScalingError, match="tokens or a FLOPs column"):
        read_points(bad)
    bad.write_text("params,tokens,loss\n1e6,1e9,3.0\n")
    with pytest.raises(ScalingError, match="cannot determine"):
        read_points(bad)
    with pytest.raises(ScalingError, match="does not exist"):
        read_points(tmp_path / "none.csv")
    with pytest.raises(ScalingError, match="neither a published law"):
        load_law("gopher")
    with pytest.raises(ScalingError, match="must be positive"):
        PUBLISHED["epoch"].optimal(0)


def test_sweep_trains_the_grid_and_resumes(textdata, tmp_path) -> None:
    cfg = SweepConfig(tokenizer=textdata["tok"], out=tmp_path, models=["1x32", "2x64"], tokens=[256, 512],
                      data=[str(textdata["prose"]), str(textdata["code"])], seq_len=32, batch_size=4,
                      progress=False)
    results = sweep(cfg)
    rows = list(csv.DictReader(results.open()))
    assert [(r["model"], int(r["tokens"])) for r in rows] == [("1x32", 256), ("1x32", 512), ("2x64", 256),
                                                              ("2x64", 512)]
    assert all(float(r["loss"]) > 0 for r in rows)
    assert int(rows[2]["params"]) > int(rows[0]["params"])
    sweep(cfg)  # nothing left to do: no new rows
    assert len(list(csv.DictReader(results.open()))) == 4
    assert all(int(r["flops"]) == 6 * int(r["params"]) * int(r["tokens"]) for r in rows)
