"""Sampler: logits -> next tokens (and logprobs) for a batch of requests with mixed settings.

Per row, in this order (vLLM's):
    token mask of a structured-outputs request: disallowed tokens -> -inf (token_mask.py), before
               everything else, logprobs included, as vLLM applies its grammar bitmask
    logprobs   of the raw model distribution, recorded before anything below (vLLM v1 default)
    logit_bias added; min_tokens: stop and EOS tokens masked until min_tokens are generated
    penalties  repetition (prompt + output tokens: positive logits / r, negative * r, as
               CTRL and transformers), frequency (- f * count in output), presence (- p if seen)
    greedy     argmax                                          (temperature < 1e-5)
    random     / temperature, min_p (drop p < min_p * p_max), top_k, top_p (smallest set with
               mass >= top_p), then one draw by the exponential race argmax(p / E), E ~ Exp(1):
               exact sampling; a seeded request draws E from its own generator, so its tokens
               do not depend on what else is in the batch.
The filter functions are public so tests can check them against direct computations.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ember.engine import native
from ember.engine.request import Logprob, PositionLogprobs, Request
from ember.engine.token_mask import apply_token_mask


def apply_penalties(logits: torch.Tensor, prompt_mask: torch.Tensor, output_counts: torch.Tensor,
                    repetition: torch.Tensor, frequency: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
    """logits (R, V); prompt_mask bool (R, V); output_counts (R, V); penalties (R,)."""
    seen = prompt_mask | (output_counts > 0)
    r = repetition[:, None]
    penalized = torch.where(logits > 0, logits / r, logits * r)
    logits = torch.where(seen, penalized, logits)
    return logits - frequency[:, None] * output_counts - presence[:, None] * (output_counts > 0).to(logits.dtype)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p (R,) times the row's top probability."""
    probs = torch.softmax(logits, dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p[:, None]
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep each row's top_k (0 = all) most likely tokens, then the smallest set of mass >= top_p."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    V = logits.shape[-1]
    k = torch.where(top_k > 0, top_k, V).clamp(max=V)
    kth = sorted_logits.gather(1, (k - 1)[:, None])  # (R, 1)
    drop_sorted = sorted_logits < kth
    sorted_logits = sorted_logits.masked_fill(drop_sorted, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted |= (mass_before >= top_p[:, None]) & (top_p[:, None] < 1)  # rounding never cuts p = 1
    drop_sorted[:, 0] = False  # the most likely token always stays
    drop = torch.empty_like(drop_sorted).scatter_(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def position_logprobs(logprobs: torch.Tensor, token: int, k: int,
                      decode: Callable[[int], str] | None) -> PositionLogprobs:
    """The chosen token's logprob and rank plus the top-k alternatives of one row (V,)."""
    chosen = float(logprobs[token])
    out: PositionLogprobs = {token: Logprob(chosen, int((logprobs > chosen).sum()) + 1)}
    if k > 0:
        values, ids = torch.topk(logprobs, k)
        for rank, (tid, lp) in enumerate(zip(ids.tolist(), values.tolist()), start=1):
            if tid not in out:
                out[tid] = Logprob(lp, rank)
    if decode is not None:
        for tid, entry in out.items():
            entry.decoded_token = decode(tid)
    return out


class Sampler:
    """Samples one token per row; see the module docstring for the pipeline."""

    def __init__(self, vocab_size: int, eos_token_ids: set[int], seed: int,
                 decode: Callable[[int], str] | None = None) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self.seed = seed
        self.generators: dict[torch.device, torch.Generator] = {}
        self.decode = decode

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self.generators:
            self.generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self.generators[device]

    def __call__(self, logits: torch.Tensor, reqs: list[Request],
                 masks: tuple[list[int], torch.Tensor] | None = None) -> list[int]:
        """Next token of each request (logits (R, V) float32); appends logprobs to the requests.

        masks: (rows, bitmask) of the constrained rows, bitmask (len(rows), ceil(V / 32)) int32.
        """
        if masks is not None:
            logits = apply_token_mask(logits, masks[0], masks[1], self.eos_token_ids)
        want_lp = [r.logprobs is not None for r in reqs]
        raw = torch.log_softmax(logits, dim=-1) if any(want_lp) else None
        x = self.process(logits, reqs)
        dev = logits.device
        greedy = torch.tensor([r.params.greedy for r in reqs], device=dev)
        tokens = native.argmax_rows(x)
        if not bool(greedy.all()):
            idx = torch.nonzero(~greedy).squeeze(1)
            sub = [reqs[i] for i in idx.tolist()]
            tokens[idx] = self._draw(self.filtered_probs(x[idx], sub), sub)
        out = tokens.tolist()
        if raw is not None:
            for i, req in enumerate(reqs):
                if want_lp[i]:
                    req.logprobs.append(position_logprobs(raw[i], out[i], req.params.logprobs, self.decode))
                    req.cumulative_logprob += req.logprobs[-1][out[i]].logprob
        return out

    def filtered_probs(self, x: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        """The distribution a sampled row draws from: processed logits x (R, V) / temperature,
        min_p, top_k, top_p, softmax (speculative decoding verifies drafts against it)."""
        dev = x.device
        temps = torch.tensor([r.params.temperature for r in reqs], device=dev)
        y = x / temps[:, None]
        min_p = torch.tensor([r.params.min_p for r in reqs], device=dev)
        if bool((min_p > 0).any()):
            y = apply_min_p(y, min_p)
        top_k = torch.tensor([r.params.top_k for r in reqs], device=dev)
        top_p = torch.tensor([r.params.top_p for r in reqs], device=dev)
        if bool((top_k > 0).any() or (top_p < 1).any()):
            y = apply_top_k_top_p(y, top_k, top_p)
        return torch.softmax(y, dim=-1)

    def generator_for(self, req: Request, device: torch.device) -> torch.Generator:
        """A seeded request's own generator (children of an n > 1 group use seed + index, as vLLM),
        else the engine's shared one."""
        if req.params.seed is None:
            return self._generator(device)
        if req.generator is None:
            req.generator = torch.Generator(device=device).manual_seed(req.params.seed + req.index)
        return req.generator

    def process(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        """logit_bias, min_tokens masks and penalties (only for rows that use them)."""
        x = logits
        for i, req in enumerate(reqs):
            p = req.params
            if p.logit_bias or req.num_output_tokens < p.min_tokens:
                x = x.clone() if x is logits else x
            if p.logit_bias:
                ids = torch.tensor(list(p.logit_bias), device=x.device)
                x[i, ids] += torch.tensor(list(p.logit_bias.values()), device=x.device, dtype=x.dtype)
            if req.num_output_tokens < p.min_tokens:
                stops = list(p.stop_token_ids) + ([] if p.ignore_eos else self.eos_token_ids)
                if stops:
                    x[i, torch.tensor(stops, device=x.device)] = float("-inf")
        rows = [i for i, r in enumerate(reqs) if r.params.needs_penalties]
        if rows:
            V, dev = x.shape[-1], x.device
            prompt_mask = torch.zeros(len(rows), V, dtype=torch.bool, device=dev)
            counts = torch.zeros(len(rows), V, dtype=x.dtype, device=dev)
            for j, i in enumerate(rows):
                r = reqs[i]
                prompt_mask[j, torch.tensor(r.prompt_token_ids, device=dev)] = True
                out_ids = torch.tensor(r.output_token_ids, dtype=torch.long, device=dev)
                counts[j].index_add_(0, out_ids, torch.ones_like(out_ids, dtype=x.dtype))
            sel = [reqs[i].params for i in rows]
            penalties = [torch.tensor([getattr(p, name) for p in sel], device=dev, dtype=x.dtype)
                         for name in ("repetition_penalty", "frequency_penalty", "presence_penalty")]
            idx = torch.tensor(rows, device=dev)
            x = x.clone() if x is logits else x
            x[idx] = apply_penalties(x[idx], prompt_mask, counts, *penalties)
        return x

    def _draw(self, probs: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        q = torch.empty_like(probs)
        unseeded = [i for i, r in enumerate(reqs) if r.params.seed is None]
        if unseeded:
            q[unseeded] = q[unseeded].exponential_(generator=self._generator(probs.device))
        for i, r in enumerate(reqs):
            if r.params.seed is not None:
                q[i].exponential_(generator=self.generator_for(r, probs.device))
        return (probs / q).argmax(dim=-1)

    def prompt_logprobs(self, logits: torch.Tensor, targets: list[int], k: int) -> list[PositionLogprobs]:
        """Logprob dicts for prompt tokens `targets` predicted by the rows of logits (m, V)."""
        lp = torch.log_softmax(logits, dim=-1)
        return [position_logprobs(lp[j], t, k, self.decode) for j, t in enumerate(targets)]
