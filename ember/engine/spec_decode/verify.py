"""SpecDecoder: the engine's speculative-decoding step, around the one target forward.

    before Scheduler.schedule()   propose(): drafts for every running request in decode
                                  (req.spec_token_ids); the scheduler computes them after the
                                  request's last token, 1 + k positions in one forward
    after the forward             accept(): rejection sampling over the k + 1 rows of logits
                                  (rejection.py) -> the tokens the engine appends one by one, so
                                  EOS, stop strings and max_tokens cut them exactly as without drafts
                                  rollback(): K/V of rejected drafts forgotten (num_computed_tokens
                                  back to the accepted length, blocks past it freed)

Requests draft nothing (and decode as without speculation, exactly) when drafts could not be
verified position by position with the state the sampler keeps: structured outputs (the grammar
would have to advance over unverified tokens), repetition/frequency/presence penalties and
min_tokens not reached yet (they depend on the output so far), an n > 1 parent before its fork.
"""

from __future__ import annotations

import torch

from ember.engine.kv_cache import KVCacheManager
from ember.engine.request import PositionLogprobs, Request
from ember.engine.sampler import Sampler, position_logprobs
from ember.engine.spec_decode.config import SpeculativeConfig
from ember.engine.spec_decode.draft_model import DraftModelProposer
from ember.engine.spec_decode.ngram import NgramProposer
from ember.engine.spec_decode.rejection import greedy_accept, rejection_sample
from ember.model.transformer import Transformer


class SpecDecoder:
    """Proposes, verifies and rolls back; counts drafted and accepted tokens for /metrics."""

    def __init__(self, config: SpeculativeConfig, max_model_len: int, draft_model: Transformer | None = None) -> None:
        self.config = config
        self.max_model_len = max_model_len
        self.ngram = NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max) \
            if config.method == "ngram" else None
        self.draft = DraftModelProposer(draft_model) if draft_model is not None else None
        self.draft_probs: dict[str, torch.Tensor] = {}
        self.num_drafts = 0  # verification steps that had at least one draft
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0

    def max_drafts(self, req: Request) -> int:
        """How many tokens req may draft now (0: decode it as without speculation)."""
        p = req.params
        if (req.matcher is not None or p.needs_penalties or req.num_output_tokens < p.min_tokens
                or req.fork_pending or req.num_computed_tokens != req.num_tokens - 1):
            return 0
        room = min(req.max_tokens - req.num_output_tokens, self.max_model_len - req.num_tokens) - 1
        return max(0, min(self.config.num_speculative_tokens, room))

    def propose(self, running: list[Request], sampler: Sampler) -> None:
        """Set req.spec_token_ids for every running request (empty where it drafts nothing)."""
        self.draft_probs.clear()
        if self.draft is not None:
            self.draft.retain({r.request_id for r in running})
        for req in running:
            k = self.max_drafts(req)
            req.spec_token_ids = []
            if k == 0:
                continue
            if self.ngram is not None:
                req.spec_token_ids = self.ngram.propose(req.token_ids, k)
                continue
            temp = 0.0 if req.params.greedy else req.params.temperature
            gen = None if req.params.greedy else sampler.generator_for(req, self.draft.device)
            capacity = min(self.max_model_len, req.num_prompt_tokens + req.max_tokens)
            drafts, probs = self.draft.propose(req.request_id, req.token_ids, k, capacity, temp, gen)
            req.spec_token_ids = drafts
            if probs is not None:
                self.draft_probs[req.request_id] = probs[:len(drafts)]

    def accept(self, req: Request, logits: torch.Tensor, sampler: Sampler) -> tuple[list[int], list[PositionLogprobs]]:
        """logits (k+1, V) at the last token and the k drafts -> tokens to append, and their logprobs
        (only when the request asked for logprobs)."""
        drafts = req.spec_token_ids
        x = sampler.process(logits, [req] * logits.shape[0])
        if req.params.greedy:
            tokens = greedy_accept(x.argmax(dim=-1).tolist(), drafts)
        else:
            probs = sampler.filtered_probs(x, [req] * logits.shape[0])
            q = self.draft_probs.get(req.request_id)
            tokens = rejection_sample(probs, drafts, q, sampler.generator_for(req, logits.device))
        self.num_drafts += 1
        self.num_draft_tokens += len(drafts)
        self.num_accepted_tokens += len(tokens) - 1
        lps: list[PositionLogprobs] = []
        if req.logprobs is not None:
            raw = torch.log_softmax(logits[:len(tokens)], dim=-1)
            lps = [position_logprobs(raw[i], t, req.params.logprobs, sampler.decode) for i, t in enumerate(tokens)]
        return tokens, lps

    @staticmethod
    def rollback(req: Request, kv: KVCacheManager) -> None:
        """After the accepted tokens were appended: forget the K/V of rejected drafts.

        The forward computed K/V for the last token and every draft; only positions before the
        newest token (the last token and the accepted drafts) stay valid. The newest token is
        computed next step, as after any decode. Blocks holding only rejected positions are freed;
        none of them was hashed, because the scheduler registers only blocks full of real tokens.
        """
        req.spec_token_ids = []
        if req.finished:
            return
        req.num_computed_tokens = min(req.num_computed_tokens, req.num_tokens - 1)
        kv.trim(req, req.num_computed_tokens + 1)
