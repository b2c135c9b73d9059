"""Exact packing: block-diagonal causal attention, so examples packed into one row never see each other.

SFT packs several short examples into one row to avoid padding (ember/data/sft.py). Plain causal
attention would let each example attend to the ones before it in the row; this backend masks
every key from another segment, and the row's positions restart at 0 for each example, so a packed
row computes exactly what each example computes alone.

    attn = SegmentAttention(segments)                     # (B, T) example index per token, -1 = pad
    logits = model(input_ids, positions, attn)
"""

from __future__ import annotations

import torch

from ember.model.attention import AttnSpec, position_bias, sdpa


class SegmentAttention:
    """An AttentionBackend (ember/model/attention.py) for packed rows without a KV cache."""

    def __init__(self, segments: torch.Tensor, positions: torch.Tensor) -> None:
        self.segments, self.positions = segments, positions  # (B, T) each
        self._bias: dict[tuple, torch.Tensor] = {}  # layers with the same masking share one bias

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttnSpec) -> torch.Tensor:
        key = (spec.sliding_window, spec.alibi, spec.num_heads, q.dtype)
        bias = self._bias.get(key)
        if bias is None:
            bias = position_bias(spec, self.positions, self.positions, q.dtype)  # (B, 1|H, T, T)
            same = self.segments.unsqueeze(-1) == self.segments.unsqueeze(-2)  # (B, T, T)
            bias = bias.masked_fill(~same.unsqueeze(1), float("-inf"))
            self._bias[key] = bias
        return sdpa(q, k, v, spec, bias, is_causal=False)


def batch_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits (B, T, V) of a collated batch: packed rows (with "segments") get SegmentAttention."""
    if "segments" in batch:
        positions = batch["positions"]
        return model(batch["input_ids"], positions, SegmentAttention(batch["segments"], positions))
    return model(batch["input_ids"])
