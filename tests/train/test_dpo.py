"""DPO / IPO losses on fixed log-probabilities (hand-computed), and response-only sequence log-probs."""

from __future__ import annotations

import math

import pytest
import torch

from ember.data.sft import IGNORE_INDEX
from ember.train.dpo import dpo_loss, reward_metrics, sequence_logprobs


def test_dpo_sigmoid_and_ipo_equal_hand_computed_values() -> None:
    pc, pr = torch.tensor([-10.0, -5.0]), torch.tensor([-12.0, -4.0])
    rc, rr = torch.tensor([-11.0, -5.0]), torch.tensor([-11.0, -5.0])
    # h = (pc - rc) - (pr - rr) = [1 - (-1), 0 - 1] = [2, -1]
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.1)
    # -log sigmoid(0.2) = log(1 + e^-0.2) = 0.598138869...; -log sigmoid(-0.1) = log(1 + e^0.1) = 0.744396660...
    assert losses.tolist() == pytest.approx([0.5981388693, 0.7443966600], abs=1e-7)
    assert chosen.tolist() == pytest.approx([0.1, 0.0]) and rejected.tolist() == pytest.approx([-0.1, 0.1])
    smoothed, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.25)
    assert smoothed[0].item() == pytest.approx(0.75 * 0.5981388693 + 0.25 * 0.7981388693, abs=1e-7)
    ipo, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="ipo")
    assert ipo.tolist() == pytest.approx([(2 - 5) ** 2, (-1 - 5) ** 2])  # (h - 1/(2*0.1))^2
    metrics = reward_metrics(chosen, rejected)
    assert metrics == pytest.approx({"rewards/chosen": 0.05, "rewards/rejected": 0.0,
                                     "rewards/margins": 0.05, "rewards/accuracies": 0.5})
    with pytest.raises(ValueError, match="unknown DPO loss"):
        dpo_loss(pc, pr, rc, rr, loss_type="hinge")


def test_sequence_logprobs_sum_over_response_tokens_only() -> None:
    logits = torch.zeros(1, 4, 3)
    logits[0, 1] = torch.tensor([math.log(2), 0.0, 0.0])  # position 1 predicts token 0 with p = 1/2
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 0, 2]])  # response = tokens 2 and 3
    # log p(0 | pos 1) + log p(2 | pos 2) = log(1/2) + log(1/3); the prompt's predictions do not count.
    assert sequence_logprobs(logits, labels).item() == pytest.approx(math.log(1 / 2) + math.log(1 / 3))
