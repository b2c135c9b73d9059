"""Direct preference optimisation: the DPO loss (Rafailov et al. 2023), IPO (Azar et al. 2023), `ember dpo`.

    ember dpo --base runs/quickstart/sft/model --data prefs.jsonl --beta 0.1 --max-steps 100

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

The reference model is the frozen base. With LoRA or QLoRA it is the same model with its
adapters disabled (`adapters_disabled`), never a second copy in memory; with --method full the
reference log-probabilities are computed once before training, with the same model, and kept
per pair. Training runs in the shared loop (ember/train/loop.py) and logs rewards/chosen,
rewards/rejected, rewards/margins and rewards/accuracies every step; validation reports the
same on held-out pairs (val_accuracy is the held-out reward accuracy).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ember.adapters.lora import adapters_disabled
from ember.data.preference import PreferenceBatches, PreferencePair, load_preference_pairs, pair_batch
from ember.data.sft import IGNORE_INDEX
from ember.train.distributed import DistInfo, all_reduce_sum
from ember.train.loop import to_device
from ember.train.tuning import FinetuneError, TuneConfig, TuneResult, lockstep_chunks, train_and_export, tuning_run

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


@dataclass(kw_only=True)
class DPOConfig(TuneConfig):
    """Align a model with preference pairs by DPO (or IPO); LoRA adapters over the frozen reference."""

    out: Path = field(default=Path("runs/dpo"), metadata={
        "help": "run folder: checkpoints/, metrics.jsonl, loss.png, adapter/ (or model/)"})
    beta: float = field(default=0.1, metadata={"help": "strength of the pull towards the reference"})
    loss_type: LossType = field(default="sigmoid", metadata={"help": "sigmoid (DPO) or ipo"})
    label_smoothing: float = field(default=0.0, metadata={"help": "assumed label noise (conservative DPO)"})
    batch_size: int = field(default=8, metadata={"help": "pairs per optimizer step, all ranks together"})
    micro_batch_size: int = field(default=4, metadata={"help": "pairs per forward pass on one rank"})
    lr: float = field(default=5e-5, metadata={"help": "peak learning rate"})


def pair_logprobs(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs of the chosen (B,) and rejected (B,) rows of a pair batch."""
    logps = sequence_logprobs(model(batch["input_ids"]), batch["labels"])
    return logps.chunk(2)


def reference_logprobs(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's log-probs: precomputed ones in the batch, else the model with adapters disabled."""
    if "ref_logps" in batch:
        return batch["ref_logps"].chunk(2)
    with torch.no_grad(), adapters_disabled(model):
        return pair_logprobs(model, batch)


class DPOObjective:
    """loss_fn for the Trainer: mean DPO loss of a pair batch, response tokens, reward metrics."""

    def __init__(self, beta: float, loss_type: LossType, label_smoothing: float) -> None:
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing

    def rewards(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        pc, pr = pair_logprobs(model, batch)
        rc, rr = reference_logprobs(model, batch)
        return dpo_loss(pc, pr, rc, rr, self.beta, self.loss_type, self.label_smoothing)

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        losses, chosen, rejected = self.rewards(model, batch)
        tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        return losses.mean(), tokens, reward_metrics(chosen, rejected)


class DPOValidation:
    """val_fn: held-out DPO loss and rewards (every rank takes a slice; sums are reduced)."""

    def __init__(self, pairs: list[PreferencePair], objective: DPOObjective, micro_batch: int, pad: int,
                 dist: DistInfo) -> None:
        self.pairs, self.objective, self.micro_batch, self.pad, self.dist = pairs, objective, micro_batch, pad, dist

    def __call__(self, model: nn.Module) -> dict[str, float]:
        if not self.pairs:
            return {}
        sums = torch.zeros(6, dtype=torch.float64, device=self.dist.device)
        for chunk, live in lockstep_chunks(self.pairs, self.micro_batch, self.dist):
            batch = to_device(pair_batch(chunk, self.pad), self.dist.device)
            losses, chosen, rejected = self.objective.rewards(model, batch)
            live = live.to(self.dist.device)
            stats = torch.stack([losses, chosen, rejected, chosen - rejected, (chosen > rejected).float(),
                                 torch.ones_like(losses)])  # (6, B)
            sums += (stats * live).sum(-1).double()
        sums = all_reduce_sum(sums, self.dist)
        loss, chosen, rejected, margin, accuracy = (sums[:5] / sums[5]).tolist()
        return {"val_loss": loss, "val_accuracy": accuracy, "val_rewards/chosen": chosen,
                "val_rewards/rejected": rejected, "val_rewards/margins": margin, "val_rewards/accuracies": accuracy}


@torch.no_grad()
def precompute_reference(model: nn.Module, pairs: list[PreferencePair], micro_batch: int, pad: int,
                         device: torch.device) -> None:
    """Store the (still untrained) model's log-probs on each pair: full DPO's reference, no copy."""
    model.eval()
    for start in range(0, len(pairs), micro_batch):
        chunk = pairs[start:start + micro_batch]
        pc, pr = pair_logprobs(model, to_device(pair_batch(chunk, pad), device))
        for pair, c, r in zip(chunk, pc.tolist(), pr.tolist()):
            pair.ref_logps = (c, r)


def dpo(cfg: DPOConfig, dist: DistInfo | None = None, peak_flops: float | None = None,
        stop_at: int | None = None) -> TuneResult:
    """Run (or resume) DPO; on rank 0 the adapter (or full model) is written when training finishes."""
    if cfg.beta <= 0:
        raise FinetuneError(f"--beta must be positive, got {cfg.beta}")
    with tuning_run(cfg, load_preference_pairs, "pair", dist) as run:
        if cfg.method == "full":
            precompute_reference(run.model.to(run.dist.device), run.train + run.val, cfg.micro_batch_size, run.pad,
                                 run.dist.device)
        if run.dist.is_main:
            print(f"DPO ({cfg.loss_type}, beta {cfg.beta}, {cfg.method}) on {len(run.train)} pairs, "
                  f"{len(run.val)} held out", flush=True)
        objective = DPOObjective(cfg.beta, cfg.loss_type, cfg.label_smoothing)
        batches = PreferenceBatches(run.train, cfg.micro_batch_size, run.pad, seed=cfg.seed, rank=run.dist.rank,
                                    world=run.dist.world)
        mean_len = sum(len(p.chosen) + len(p.rejected) for p in run.train) / (2 * len(run.train))
        # Per token, three forwards' worth: full = forward + backward (2); LoRA = forward + a backward
        # without weight gradients (1) + the reference forward (1).
        flops = 3 * run.model.config.flops_per_token(int(mean_len), training=False)
        validation = DPOValidation(run.val, objective, cfg.micro_batch_size, run.pad, run.dist)
        return train_and_export(cfg, run, objective, batches, validation, flops, peak_flops, stop_at)
