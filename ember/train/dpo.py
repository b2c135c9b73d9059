"""Direct preference optimisation: the DPO loss (Rafailov et al. 2023) and IPO (Azar et al. 2023).

With policy log-probabilities pi(y|x) and reference log-probabilities ref(y|x), each summed over
the response tokens only, and h = [log pi(y_c) - log ref(y_c)] - [log pi(y_r) - log ref(y_r)]:

    sigmoid (DPO):  loss = -log sigmoid(beta * h)            (label smoothing eps: conservative DPO,
                           (1 - eps) * that + eps * -log sigmoid(-beta * h))
    ipo:            loss = (h - 1 / (2 * beta))^2

The implicit rewards are beta * (log pi(y) - log ref(y)); training logs their means for chosen
and rejected answers, the mean margin, and the accuracy (fraction with chosen > rejected).
Note: TRL's "ipo" divides log-probabilities by the response length first; here both losses use
sums, as the issue (and the DPO paper) define them.

    logp = sequence_logprobs(model(ids), labels)         # (B,)
    losses, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, beta=0.1)
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from ember.data.sft import IGNORE_INDEX

LossType = Literal["sigmoid", "ipo"]


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over each row of log p(labels[t] | tokens < t), counting only labels != IGNORE_INDEX.

    logits (B, T, V) from the model on the row's ids; labels (B, T) aligned with the ids.
    """
    targets = labels[:, 1:]  # token t is predicted at position t - 1
    mask = targets != IGNORE_INDEX
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # (B, T - 1)
    return (picked * mask).sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float = 0.1,
             loss_type: LossType = "sigmoid", label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses (B,) and the implicit rewards of chosen and rejected answers (B,) each (detached)."""
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}: use sigmoid or ipo")
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


def reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, float]:
    """rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies (means over pairs)."""
    return {"rewards/chosen": chosen_rewards.mean().item(),
            "rewards/rejected": rejected_rewards.mean().item(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item()}
