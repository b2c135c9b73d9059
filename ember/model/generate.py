"""Naive reference generation with a contiguous KV cache.

The simplest correct decoder: one batch of equal-length prompts, a preallocated
(B, Hkv, T_max, D) cache per layer, prefill then one token per step. It is the reference the
serving engine (`ember/engine/`) must match token for token and beat on speed, and the path
`ember generate` uses.

    ids = generate(model, torch.tensor([prompt_ids]), max_new_tokens=32)   # greedy
    ids = generate(model, x, max_new_tokens=32, temperature=0.8, top_p=0.95, seed=0)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ember.config import ModelConfig
from ember.model.attention import AttnSpec, position_bias, sdpa
from ember.model.transformer import Transformer


class KVCache:
    """Contiguous per-layer K/V buffers for a batch of sequences sharing one position counter.

    Implements the AttentionBackend protocol: `attend` writes this step's k/v at
    [start, start + T) and attends over [0, start + T). Call `advance(T)` after each forward.
    """

    def __init__(self, model: Transformer, batch: int, max_len: int) -> None:
        cfg = model.config
        p = next(model.parameters())
        shape = (batch, cfg.n_kv_heads, max_len, cfg.d_head)
        self.k = [torch.empty(shape, dtype=p.dtype, device=p.device) for _ in range(cfg.num_layers)]
        self.v = [torch.empty(shape, dtype=p.dtype, device=p.device) for _ in range(cfg.num_layers)]
        self.max_len = max_len
        self.start = 0

    def advance(self, n: int) -> None:
        self.start += n

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttnSpec) -> torch.Tensor:
        B, T = q.shape[:2]
        end = self.start + T
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} tokens exceed its {self.max_len}")
        kc, vc = self.k[spec.layer_idx], self.v[spec.layer_idx]
        kc[:, :, self.start:end] = k.transpose(1, 2)
        vc[:, :, self.start:end] = v.transpose(1, 2)
        keys = kc[:, :, :end].transpose(1, 2)  # (B, end, Hkv, D)
        values = vc[:, :, :end].transpose(1, 2)
        if self.start == 0 and spec.sliding_window is None and not spec.alibi:
            return sdpa(q, keys, values, spec, None, is_causal=True)
        if T == 1 and (spec.sliding_window is None or end <= spec.sliding_window) and not spec.alibi:
            return sdpa(q, keys, values, spec, None, is_causal=False)
        q_pos = torch.arange(self.start, end, device=q.device).unsqueeze(0)
        k_pos = torch.arange(end, device=q.device).unsqueeze(0)
        return sdpa(q, keys, values, spec, position_bias(spec, q_pos, k_pos, q.dtype), is_causal=False)


def stop_token_ids(cfg: ModelConfig, tokenizer_eos: int | None) -> set[int]:
    """Token ids that end a generation: the model's eos ids and the tokenizer's eos."""
    ids = set(cfg.eos_token_id)
    if tokenizer_eos is not None:
        ids.add(tokenizer_eos)
    return ids


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """Pick one token per row of (B, vocab) logits: greedy at temperature 0, else filtered sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token once the mass before it already reaches top_p (always keep the first).
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(model: Transformer, input_ids: torch.Tensor, max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             eos_token_ids: Iterable[int] = (), seed: int | None = None) -> torch.Tensor:
    """Continue each row of input_ids (B, T) by up to max_new_tokens; returns (B, T + n).

    Rows that emit an EOS token keep emitting it (as HF pads finished rows), and generation
    stops once every row has finished.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError("generate needs input_ids of shape (batch, prompt_len) with prompt_len >= 1")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"bad sampling settings: temperature={temperature}, top_k={top_k}, top_p={top_p}")
    B, T = input_ids.shape
    total = T + max_new_tokens
    limit = model.config.max_position_embeddings
    if total > limit and model.config.rope_scaling.rope_type != "dynamic" and model.config.position == "rope":
        raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"context of {limit} tokens")
    device = next(model.parameters()).device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long, device=device)
    cache = KVCache(model, B, total)
    out = input_ids.to(device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    step_ids, positions = out, torch.arange(T, device=device).expand(B, T)
    for _ in range(max_new_tokens):
        logits = model(step_ids, positions, cache)[:, -1]
        cache.advance(step_ids.shape[1])
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        if eos.numel():
            nxt = torch.where(finished, eos[0], nxt)
            finished |= torch.isin(nxt, eos)
        out = torch.cat([out, nxt[:, None]], dim=1)
        if eos.numel() and bool(finished.all()):
            break
        step_ids = nxt[:, None]
        positions = torch.full((B, 1), cache.start, device=device, dtype=torch.long)
    return out
