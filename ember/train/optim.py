"""AdamW with decay on matrices only, and the warmup + cosine learning-rate schedule.

    opt = build_adamw(model, lr=6e-4, weight_decay=0.1, betas=(0.9, 0.95))
    for g in opt.param_groups: g["lr"] = lr_at(step, peak=6e-4, warmup=100, total=5000, min_ratio=0.1)

Weight decay applies to parameters with two or more dimensions (linear weights, embeddings);
norm gains and biases are not decayed. Frozen parameters (requires_grad False, as under LoRA)
are left out entirely, so the optimizer holds no state for them.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ember.errors import EmberError


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() yields each tied tensor once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_adamw(model: nn.Module, lr: float, weight_decay: float,
                betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8) -> torch.optim.AdamW:
    groups = param_groups(model, weight_decay)
    if not any(g["params"] for g in groups):
        raise EmberError("the model has no trainable parameters (every one has requires_grad=False)")
    params = [p for g in groups for p in g["params"]]
    # The fused kernel is one pass over all parameters; DTensor (FSDP2) parameters use foreach.
    plain = all(type(p) in (torch.Tensor, nn.Parameter) for p in params)
    kind = {"fused": True} if plain else {"foreach": True}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **kind)


def lr_at(step: int, *, peak: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine to min_ratio * peak."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
