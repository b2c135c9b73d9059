"""Log-likelihood of token spans: the one primitive every likelihood metric is built from.

A Span is a token list whose last `n_score` tokens are scored, each conditioned on every
token before it in the list:

    tokens = [c0 c1 c2 | x0 x1]   n_score = 2   ->   log p(x0 | c0..c2) + log p(x1 | c0..c2 x0)

Multiple-choice continuations (lm-evaluation-harness `loglikelihood`) and rolling perplexity
windows (`loglikelihood_rolling`) are both lists of spans. The in-process backend scores them
with one batched forward per batch (score_spans); the HTTP backend asks a server to echo the
prompt's log-probabilities. Both see the same spans, so both give the same numbers.

Tokenisation follows the harness exactly (`encode_pair`): trailing whitespace of the context
moves to the continuation, the pair is encoded whole and the continuation is what follows the
context's own encoding; an empty context is replaced by the prefix token (BOS, else EOS).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ember.errors import EmberError

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # (B, T) ids -> (B, T, vocab) logits
Encode = Callable[[str], list[int]]


@dataclass(frozen=True)
class Span:
    """Score the last n_score of `tokens` (n_score <= len(tokens) - 1)."""

    tokens: tuple[int, ...]
    n_score: int


class NoPrefixTokenError(EmberError):
    """The tokenizer has no BOS or EOS token to condition a text's first token on."""


def prefix_token_id(tokenizer) -> int:
    """The token that conditions a document's first token: BOS, else EOS (as the harness does)."""
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return tid
    raise NoPrefixTokenError("log-likelihoods (perplexity, multiple choice) need the tokenizer to have a BOS or "
                             "EOS token to predict a text's first token, and this one has neither; set "
                             "bos_token or eos_token in its tokenizer_config.json")


def encode_pair(encode: Encode, context: str, continuation: str, prefix_id: int) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-evaluation-harness splits them."""
    if context == "":
        return [prefix_id], encode(continuation)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = encode(context + continuation)
    ctx = encode(context)
    return ctx, whole[len(ctx):]


def pair_span(ctx: Sequence[int], cont: Sequence[int], max_len: int) -> Span:
    """The span scoring `cont` after `ctx`, its model input cut from the left to max_len tokens."""
    if not cont:
        raise ValueError("a continuation must encode to at least one token")
    if len(cont) > max_len:
        raise ValueError(f"a continuation of {len(cont)} tokens does not fit a {max_len}-token window")
    return Span(tuple([*ctx, *cont][-(max_len + 1):]), len(cont))


@torch.no_grad()
def score_spans(logits_fn: LogitsFn, spans: Sequence[Span], batch_size: int = 8,
                device: torch.device | str = "cpu") -> list[tuple[float, bool]]:
    """(sum of log-probs, whether every scored token is the argmax) for each span.

    Spans are batched longest first (so padding is small) and right-padded: in a causal model
    padding after a position never changes it. Results come back in the input order.
    """
    order = sorted(range(len(spans)), key=lambda i: -len(spans[i].tokens))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(spans)
    for b in range(0, len(order), batch_size):
        chunk = order[b:b + batch_size]
        width = max(len(spans[i].tokens) for i in chunk) - 1
        batch = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, i in enumerate(chunk):
            inp = spans[i].tokens[:-1]
            batch[row, :len(inp)] = torch.tensor(inp)
        logprobs = F.log_softmax(logits_fn(batch.to(device)).float(), dim=-1).cpu()  # (B, T, vocab)
        for row, i in enumerate(chunk):
            span = spans[i]
            n_in = len(span.tokens) - 1
            preds = logprobs[row, n_in - span.n_score:n_in]  # (n_score, vocab)
            targets = torch.tensor(span.tokens[-span.n_score:])
            ll = preds.gather(-1, targets[:, None]).sum().item()
            out[i] = (ll, bool((preds.argmax(-1) == targets).all()))
    return out
