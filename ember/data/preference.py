"""Preference pairs for DPO: a prompt with a chosen and a rejected answer, rendered by the chat template.

    pairs = load_preference_pairs("prefs.jsonl", tokenizer, max_len=512)
    batches = PreferenceBatches(pairs, micro_batch=4, pad_id=tok.pad_token_id)
    batch = batches.next_batch()   # input_ids/labels (2B, T): B chosen rows, then their B rejected rows

Records are {"prompt", "chosen", "rejected"} (strings, or message lists; see
ember/data/conversations.py). Each side is prompt + answer rendered as one conversation, with
labels on the answer's tokens only, so a sequence's log-probability sums over the response alone.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ember.data.conversations import read_jsonl, to_preference
from ember.data.sft import ExampleOrder, TokenizedChat, collate, collect_usable, tokenize_chat, truncate
from ember.tokenizer import Tokenizer


@dataclass
class PreferencePair:
    chosen: TokenizedChat
    rejected: TokenizedChat
    ref_logps: tuple[float, float] | None = None  # reference log-probs, when computed ahead (full DPO)


def load_preference_pairs(path: str | os.PathLike, tok: Tokenizer, max_len: int) -> list[PreferencePair]:
    """Every usable pair of a preference jsonl file; pairs whose answers do not start within
    max_len tokens are skipped with a warning, and a file with none left is an error."""
    def rows():
        for where, record in read_jsonl(path):
            prompt, chosen, rejected = to_preference(record, where)
            yield where, lambda: PreferencePair(
                truncate(tokenize_chat(tok, prompt + chosen, first=len(prompt)), max_len),
                truncate(tokenize_chat(tok, prompt + rejected, first=len(prompt)), max_len))

    return collect_usable(path, rows(), lambda p: p.chosen.loss_tokens > 0 and p.rejected.loss_tokens > 0,
                          "preference pair", "prompt/chosen/rejected records with non-empty answers", max_len)


def pair_batch(pairs: Sequence[PreferencePair], pad_id: int) -> dict[str, torch.Tensor]:
    """One forward pass for both sides: rows 0..B-1 are the chosen answers, B..2B-1 the rejected."""
    batch = collate([[p.chosen] for p in pairs] + [[p.rejected] for p in pairs], pad_id)
    if all(p.ref_logps is not None for p in pairs):
        batch["ref_logps"] = torch.tensor([p.ref_logps[0] for p in pairs] + [p.ref_logps[1] for p in pairs])
    return batch


class PreferenceBatches:
    """This rank's micro-batches of pairs in a seeded order per epoch (the training loop's BatchSource)."""

    def __init__(self, pairs: Sequence[PreferencePair], micro_batch: int, pad_id: int, *, seed: int = 0,
                 rank: int = 0, world: int = 1) -> None:
        self.pairs, self.micro_batch, self.pad_id, self.rank, self.world = pairs, micro_batch, pad_id, rank, world
        self.order = ExampleOrder(len(pairs), seed)

    def next_batch(self) -> dict[str, torch.Tensor]:
        picked = [self.pairs[self.order.next()] for _ in range(self.world * self.micro_batch)]
        return pair_batch(picked[self.rank * self.micro_batch:(self.rank + 1) * self.micro_batch], self.pad_id)

    def state_dict(self) -> dict:
        return {"consumed": self.order.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.order.consumed = int(state["consumed"])
