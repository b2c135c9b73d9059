"""The one train/serve switch of the model: where attention gets its keys and values.

`Attention.forward(x, cos_sin, attn)` projects q/k/v, rotates them, then either
  attn is None  -> `causal_attention`: dense causal SDPA over the (B, T) batch (training, eval)
  attn given    -> `attn.attend(q, k, v, spec)`: a backend object passed explicitly by the caller
                   that owns a KV cache (never a global). Two implement it:
                     ember.model.generate.KVCache   contiguous per-sequence cache (naive generate)
                     ember.engine's AttnMetadata    paged blocks + slot mapping (serving)

    q (B, T, H, D)   k, v (B, T, Hkv, D)   ->   y (B, T, H, D)

`AttnSpec` carries a layer's constants (head counts, scale, sliding window, ALiBi slopes) so
every backend applies the same masking rules:
  key j is visible from query i  iff  pos_j <= pos_i  and (no window or pos_i - pos_j < window)
  ALiBi adds -slope_h * (pos_i - pos_j) to the score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from ember.model.rope import alibi_slopes


@dataclass(frozen=True)
class AttnSpec:
    """Constants of one attention layer that every backend needs."""

    layer_idx: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    sliding_window: int | None
    alibi: bool
    alibi_scale: float = 1.0  # slopes multiplied by this (Falcon: 1/sqrt(head_dim))
    # A tensor-parallel shard holds heads [head_offset, head_offset + num_heads) of total_heads.
    head_offset: int = 0
    total_heads: int | None = None

    def alibi_slopes(self, device: torch.device | None = None) -> torch.Tensor:
        """This layer's per-head ALiBi slopes (H,) in fp32."""
        slopes = alibi_slopes(self.total_heads or self.num_heads, device)
        slopes = slopes[self.head_offset:self.head_offset + self.num_heads]
        return slopes if self.alibi_scale == 1.0 else slopes * self.alibi_scale


class AttentionBackend(Protocol):
    """What the model calls for attention when it is given a cache (see module docstring)."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               spec: AttnSpec) -> torch.Tensor: ...


def position_bias(spec: AttnSpec, q_pos: torch.Tensor, k_pos: torch.Tensor,
                  dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (B, 1 or H, Tq, Tk) built from absolute positions.

    q_pos (B, Tq), k_pos (B, Tk). Masked entries are -inf; ALiBi adds its linear bias.
    """
    dist = q_pos.unsqueeze(-1) - k_pos.unsqueeze(-2)  # (B, Tq, Tk)
    visible = dist >= 0
    if spec.sliding_window is not None:
        visible &= dist < spec.sliding_window
    bias = torch.zeros(dist.shape, dtype=dtype, device=dist.device)
    bias.masked_fill_(~visible, float("-inf"))
    bias = bias.unsqueeze(1)  # (B, 1, Tq, Tk)
    if spec.alibi:
        slopes = spec.alibi_slopes(dist.device)
        bias = bias - slopes.to(dtype).view(1, -1, 1, 1) * dist.unsqueeze(1).to(dtype)
    return bias


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttnSpec,
         bias: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
    """Scaled dot-product attention on (B, T, H, D) tensors with GQA head sharing."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
    rep = spec.num_heads // spec.num_kv_heads
    if rep > 1:
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=is_causal and bias is None,
                                       scale=spec.scale)
    return y.transpose(1, 2)  # (B, T, H, D)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     spec: AttnSpec) -> torch.Tensor:
    """Dense causal attention over a batch of sequences that all start at position 0."""
    if spec.sliding_window is None and not spec.alibi:
        return sdpa(q, k, v, spec, None, is_causal=True)
    T = q.shape[1]
    pos = torch.arange(T, device=q.device).unsqueeze(0)
    return sdpa(q, k, v, spec, position_bias(spec, pos, pos, q.dtype), is_causal=False)
