"""Supervised fine-tuning: next-token loss on assistant tokens only, with LoRA, QLoRA or all weights.

    ember finetune --base runs/quickstart/model --data chat.jsonl --method lora --max-steps 200
    result = finetune(FinetuneConfig(base=Path("base"), data=Path("chat.jsonl")))

The data is jsonl in Alpaca, OpenAI `messages` or ShareGPT `conversations` form, rendered with the
base's chat template (ember/data/sft.py); the loss is the mean cross-entropy over the assistant's
tokens (answers and end-of-turn), so prompts, system text and padding cost nothing. Training runs
in the shared loop (ember/train/loop.py: accumulation, clipping, schedule, checkpoints and resume,
DDP/FSDP); validation reports the held-out assistant-token loss before and after. The result is a
PEFT adapter in <out>/adapter or, with --method full, a model in <out>/model (ember/train/tuning.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ember.data.sft import IGNORE_INDEX, SFTBatches, TokenizedChat, collate, load_sft_examples
from ember.train.distributed import DistInfo, all_reduce_sum
from ember.train.loop import to_device
from ember.train.packing import batch_logits
from ember.train.tuning import TuneConfig, TuneResult, lockstep_chunks, train_and_export, tuning_run


def token_nll(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed cross-entropy over labelled tokens (B,) and the labelled-token counts (B,)."""
    logits = batch_logits(model, batch)
    targets = batch["labels"][:, 1:]  # token t is predicted at position t - 1
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), targets, ignore_index=IGNORE_INDEX,
                          reduction="none")  # (B, T - 1), 0 where ignored
    return nll.sum(-1), (targets != IGNORE_INDEX).sum(-1)


def sft_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(mean loss over labelled tokens, number of labelled tokens) of one collated batch."""
    nll, counts = token_nll(model, batch)
    n = int(counts.sum())
    return nll.sum() / max(n, 1), n


@dataclass(kw_only=True)
class FinetuneConfig(TuneConfig):
    """Fine-tune a model on chat data (LoRA, QLoRA or all weights); loss on assistant tokens only."""

    out: Path = field(default=Path("runs/finetune"), metadata={
        "help": "run folder: checkpoints/, metrics.jsonl, loss.png, adapter/ (or model/)"})
    pack: bool = field(default=False, metadata={
        "help": "pack several examples per row up to --max-len (attention stays within each example)"})


class SFTValidation:
    """val_fn for the Trainer: held-out assistant-token loss and perplexity (every rank takes a slice)."""

    def __init__(self, examples: list[TokenizedChat], micro_batch: int, pad: int, dist: DistInfo) -> None:
        self.examples, self.micro_batch, self.pad, self.dist = examples, micro_batch, pad, dist

    def __call__(self, model: nn.Module) -> dict[str, float]:
        if not self.examples:
            return {}
        sums = torch.zeros(2, dtype=torch.float64, device=self.dist.device)  # (nll, tokens)
        for chunk, live in lockstep_chunks(self.examples, self.micro_batch, self.dist):
            batch = to_device(collate([[ex] for ex in chunk], self.pad), self.dist.device)
            nll, counts = token_nll(model, batch)
            live = live.to(self.dist.device)
            sums += torch.stack([(nll * live).sum(), (counts * live).sum()]).double()
        sums = all_reduce_sum(sums, self.dist)
        loss = float(sums[0] / sums[1].clamp_min(1))
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


def finetune(cfg: FinetuneConfig, dist: DistInfo | None = None, peak_flops: float | None = None,
             stop_at: int | None = None) -> TuneResult:
    """Run (or resume) SFT; on rank 0 the adapter (or full model) is written when training finishes."""
    with tuning_run(cfg, load_sft_examples, "example", dist) as run:
        batches = SFTBatches(run.train, cfg.micro_batch_size, run.pad, pack=cfg.pack, seq_len=cfg.max_len,
                             seed=cfg.seed, rank=run.dist.rank, world=run.dist.world)
        if run.dist.is_main:
            print(f"fine-tuning ({cfg.method}) on {len(run.train)} examples, {len(run.val)} held out; "
                  f"{sum(e.loss_tokens for e in run.train):,} assistant tokens per epoch", flush=True)
        mean_len = sum(len(e) for e in run.train) / len(run.train)
        # A frozen weight skips its gradient: LoRA's backward costs about one forward, not two.
        flops = run.model.config.flops_per_token(int(mean_len)) * (1.0 if cfg.method == "full" else 2 / 3)
        validation = SFTValidation(run.val, cfg.micro_batch_size, run.pad, run.dist)
        return train_and_export(cfg, run, sft_loss, batches, validation, flops, peak_flops, stop_at)
