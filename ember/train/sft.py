"""Supervised fine-tuning: next-token loss on assistant tokens only, with LoRA, QLoRA or all weights.

    loss, n = sft_loss(model, batch)     # batch from ember.data.sft.SFTBatches

The loss is the mean cross-entropy over tokens whose label is not IGNORE_INDEX (the assistant's
answers and end-of-turn tokens); prompts, system text and padding cost nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ember.data.sft import IGNORE_INDEX
from ember.train.packing import batch_logits


def sft_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(mean loss over labelled tokens, number of labelled tokens) of one collated batch."""
    logits = batch_logits(model, batch)
    targets = batch["labels"][:, 1:]  # token t is predicted at position t - 1
    n = int((targets != IGNORE_INDEX).sum())
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return loss / max(n, 1), n
