"""Position encodings: rotary embeddings (rotate-half layout, scaling variants) and ALiBi slopes.

RoPE uses the rotate-half layout of Hugging Face Llama, so q/k projection weights from HF
checkpoints load without permutation. cos/sin are computed once per forward for the given
positions (any shape, e.g. (B, T) for training or (1, N) flattened tokens when serving) and
shared by every layer. Scaling types follow HF's definitions: linear (position interpolation),
dynamic NTK (base grows once a sequence exceeds the trained context) and llama3 (per-band
wavelength scaling).
"""

from __future__ import annotations

import math

import torch

from ember.config import ModelConfig


def rope_inv_freq(cfg: ModelConfig, seq_len: int | None = None,
                  device: torch.device | None = None) -> torch.Tensor:
    """Inverse frequencies (d_head/2,) in fp32 for a config, after its scaling rule."""
    dim = cfg.d_head
    base = cfg.rope_theta
    sc = cfg.rope_scaling
    if sc.rope_type == "dynamic" and seq_len is not None and seq_len > cfg.max_position_embeddings:
        # NTK-aware: enlarge the base so the longest wavelength spans the longer context.
        ratio = sc.factor * seq_len / cfg.max_position_embeddings - (sc.factor - 1)
        base = base * ratio ** (dim / (dim - 2))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    inv_freq = 1.0 / (base ** exponents)
    if sc.rope_type == "linear":
        inv_freq = inv_freq / sc.factor
    elif sc.rope_type == "llama3":
        old_ctx = sc.original_max_position_embeddings or cfg.max_position_embeddings
        low_wavelen = old_ctx / sc.low_freq_factor
        high_wavelen = old_ctx / sc.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / sc.factor, inv_freq)
        smooth = (old_ctx / wavelen - sc.low_freq_factor) / (sc.high_freq_factor - sc.low_freq_factor)
        smoothed = (1 - smooth) * scaled / sc.factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(cfg: ModelConfig, positions: torch.Tensor, dtype: torch.dtype,
                 inv_freq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin of shape positions.shape + (1, d_head), ready to broadcast over heads.

    The sin's first half is negated, so that `apply_rope` rotates with one roll instead of
    rotate_half's slices, negation and concatenation (5x fewer memory passes for a prefill).
    inv_freq: rope_inv_freq(cfg, None, positions.device) computed once by a caller that reuses
    it (the serving engine); not for dynamic scaling, whose frequencies depend on the positions.
    """
    if cfg.rope_scaling.rope_type == "dynamic":
        inv_freq = rope_inv_freq(cfg, int(positions.max().item()) + 1, positions.device)
    elif inv_freq is None:
        inv_freq = rope_inv_freq(cfg, None, positions.device)
    freqs = positions.float().unsqueeze(-1) * inv_freq  # (..., d_head/2)
    emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(-2)  # (..., 1, d_head)
    sin = emb.sin()
    sin[..., :freqs.shape[-1]].neg_()
    return emb.cos().to(dtype), sin.to(dtype)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (..., H, D) and k (..., Hkv, D) by position; cos/sin (..., 1, D) from rope_cos_sin.

    HF's x * cos + rotate_half(x) * sin with rotate_half(x) = (-x2, x1): rolling x by half gives
    (x2, x1), and the signed sin supplies the minus.
    """
    return rotate(q, cos, sin), rotate(k, cos, sin)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """One tensor (..., heads, D) of `apply_rope`.

    Two products rounded, then their sum, as transformers computes it: addcmul's fused
    multiply-add rounds once, and that one-ulp difference grew through Gemma 3's ~1e5-sized
    residual stream into logits 1.5e-4 away from transformers' (now bit-identical).
    """
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


def alibi_slopes(num_heads: int, device: torch.device | None = None) -> torch.Tensor:
    """Per-head ALiBi slopes (Press et al. 2022), including the non-power-of-two rule."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-8.0 / closest)
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest < num_heads:
        extra_base = 2.0 ** (-4.0 / closest)
        slopes += [extra_base ** (2 * i + 1) for i in range(num_heads - closest)]
    return torch.tensor(slopes, dtype=torch.float32, device=device)
