"""DraftModelProposer: a smaller model with the target's vocabulary drafts k tokens per step.

Each request gets its own contiguous draft KV cache (ember.model.generate.KVCache, batch 1),
sized to the request's longest possible length. Before drafting, the cache is rolled back to the
longest common prefix of what it holds and the request's tokens (rejected drafts drop out this
way, and a preempted request simply continues), the missing tokens are fed in one forward, then
k - 1 single-token forwards draft the rest. Greedy requests draft the draft model's argmax (a
point-mass proposal); sampled requests draw from its softmax at the request's temperature and
return those distributions as q for rejection sampling.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ember.model.generate import KVCache
from ember.model.transformer import Transformer


@dataclass
class DraftState:
    cache: KVCache
    tokens: list[int] = field(default_factory=list)  # tokens whose K/V the cache holds, in order


class DraftModelProposer:
    """Drafts with a separate small model (see the module docstring)."""

    def __init__(self, model: Transformer) -> None:
        self.model = model.eval()
        self.device = next(model.parameters()).device  # the target's: one generator serves both
        self.states: dict[str, DraftState] = {}

    def retain(self, live: set[str]) -> None:
        """Drop the caches of requests that are gone."""
        for rid in [r for r in self.states if r not in live]:
            del self.states[rid]

    @torch.inference_mode()
    def propose(self, request_id: str, token_ids: list[int], k: int, capacity: int, temperature: float,
                generator: torch.Generator | None) -> tuple[list[int], torch.Tensor | None]:
        """Up to k draft tokens after token_ids, and their proposal distributions (None: point masses).

        capacity: the most tokens this request can ever hold (its cache's size).
        """
        limit = self.model.config.max_position_embeddings
        if len(token_ids) + k > min(capacity, limit):
            k = min(capacity, limit) - len(token_ids)
        if k < 1:
            return [], None
        st = self.states.get(request_id)
        if st is None:
            st = self.states[request_id] = DraftState(KVCache(self.model, 1, min(capacity, limit)))
        keep = 0
        for a, b in zip(st.tokens, token_ids):
            if a != b:
                break
            keep += 1
        keep = min(keep, len(token_ids) - 1)  # the last token is fed again: its logits draft d_1
        st.cache.start, st.tokens = keep, st.tokens[:keep]
        feed = token_ids[keep:]
        drafts: list[int] = []
        probs: list[torch.Tensor] = []
        dev = self.device
        for _ in range(k):
            x = torch.tensor([feed], device=dev)
            pos = torch.arange(st.cache.start, st.cache.start + len(feed), device=dev)[None]
            logits = self.model(x, pos, st.cache)[0, -1].float()
            st.cache.advance(len(feed))
            st.tokens.extend(feed)
            if temperature <= 0:
                token = int(logits.argmax())
            else:
                q = torch.softmax(logits / temperature, dim=-1)
                token = int(torch.multinomial(q, 1, generator=generator))
                probs.append(q)
            drafts.append(token)
            feed = [token]
        return drafts, (torch.stack(probs) if probs else None)
