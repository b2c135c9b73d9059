"""The shared Trainer on a non-LM objective: parameter groups, schedule, accumulation, bad steps."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from ember.train.loop import TrainConfig, Trainer, TrainingError
from ember.train.optim import build_adamw, lr_at


class Regression:
    """A BatchSource of linear-regression micro-batches; its position is the samples served."""

    def __init__(self, micro: int = 4) -> None:
        self.i, self.micro = 0, micro

    def next_batch(self) -> dict[str, torch.Tensor]:
        # Sample k is the same whatever the micro-batch size (seeded by its own index).
        x = torch.stack([torch.randn(8, generator=torch.Generator().manual_seed(k))
                         for k in range(self.i, self.i + self.micro)])
        self.i += self.micro
        return {"x": x, "y": x @ torch.arange(8.0) + 1.0}

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, state: dict) -> None:
        self.i = state["i"]


def mse(model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    return ((model(batch["x"]).squeeze(-1) - batch["y"]) ** 2).mean(), len(batch["x"])


def cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(out=tmp_path, max_steps=40, batch_size=8, micro_batch_size=4, lr=0.05, warmup_steps=4,
                eval_every=0, save_every=0, progress=False)
    return TrainConfig(**(base | kw))


def test_any_objective_trains(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 1))
    val = lambda m: {"val_loss": float(mse(m, Regression(64).next_batch())[0])}  # noqa: E731
    result = Trainer(model, cfg(tmp_path), mse, Regression(), val_fn=val, peak_flops=1e9).fit()
    assert result.step == 40 and result.val["val_loss"] < 0.05 * result.first_val["val_loss"]
    assert (tmp_path / "metrics.jsonl").exists() and (tmp_path / "loss.png").stat().st_size > 1000


def test_weight_decay_only_on_trainable_matrices() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    model[2].weight.requires_grad_(False)  # frozen, as a base weight under LoRA
    opt = build_adamw(model, lr=1e-3, weight_decay=0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and [p.shape for p in decay["params"]] == [(4, 4)]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 4  # 2 biases + norm gain/bias
    assert opt.defaults["betas"] == (0.9, 0.95)


def test_warmup_then_cosine_to_ten_percent() -> None:
    lrs = [lr_at(s, peak=1.0, warmup=10, total=110) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == 1.0 and lrs[10] == 1.0
    assert lrs[60] == pytest.approx(0.55) and lr_at(110, peak=1.0, warmup=10, total=110) == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_accumulation_equals_one_big_batch(tmp_path) -> None:
    runs = []
    for micro in (8, 2):
        torch.manual_seed(0)
        model = nn.Linear(8, 1)
        Trainer(model, cfg(tmp_path / str(micro), max_steps=3, micro_batch_size=micro), mse,
                Regression(micro), peak_flops=1e9).fit()
        runs.append(model.weight.detach().clone())
    assert torch.allclose(runs[0], runs[1], atol=1e-6)


class Flaky:
    """Wraps mse with non-finite losses at chosen calls."""

    def __init__(self, bad: set[int]) -> None:
        self.bad, self.calls = bad, 0

    def __call__(self, model, batch):
        loss, n = mse(model, batch)
        self.calls += 1
        return (loss * math.nan if self.calls - 1 in self.bad else loss), n


def test_non_finite_steps_are_skipped_and_counted(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    flaky = Flaky({4, 5, 6})  # micro-batches of steps 3 and 4 (2 per step)
    trainer = Trainer(model, cfg(tmp_path, max_steps=6), flaky, Regression(), peak_flops=1e9)
    result = trainer.fit()
    assert result.skipped_steps == 2 and result.step == 6
    records = [r for r in trainer.metrics.read() if "loss" in r]
    assert [r.get("skipped", False) for r in records] == [False, False, True, True, False, False]


def test_too_many_bad_steps_in_a_row_stop_with_a_clear_error(tmp_path) -> None:
    model = nn.Linear(8, 1)
    with pytest.raises(TrainingError, match="non-finite for 3 steps in a row.*lower --lr"):
        Trainer(model, cfg(tmp_path, max_bad_steps=3), Flaky(set(range(1000))), Regression(), peak_flops=1e9).fit()


def test_a_new_run_never_overwrites_an_earlier_one(tmp_path) -> None:
    Trainer(nn.Linear(8, 1), cfg(tmp_path, max_steps=2), mse, Regression(), peak_flops=1e9).fit()
    with pytest.raises(TrainingError, match="already holds checkpoints.*--resume"):
        Trainer(nn.Linear(8, 1), cfg(tmp_path, max_steps=2, resume=False), mse, Regression(), peak_flops=1e9).fit()


def test_batch_that_does_not_divide_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        Trainer(nn.Linear(8, 1), cfg(tmp_path, batch_size=6, micro_batch_size=4), mse, Regression())
