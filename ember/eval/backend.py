"""What an evaluation task needs from a model, whatever runs it: the Backend protocol.

    backend.loglikelihood([(context, continuation), ...])  -> [(sum log p(continuation | context), is_greedy)]
    backend.loglikelihood_rolling([text, ...])              -> [(sum log p(text), tokens)]
    backend.generate([prompt or messages, ...], GenerationParams(max_tokens=256, stop=["Question:"]))
                                                            -> [text, ...]

These are lm-evaluation-harness's three request types. Two implementations:
ember.eval.local_backend.LocalBackend (an ember model in this process) and
ember.eval.http_backend.OpenAIBackend (any OpenAI-compatible server, ember's included).
Both derive from TokenBackend, which turns the likelihood requests into token Spans in one
place (ember.eval.loglikelihood), so the two agree to the last bit of tokenisation; each only
implements `score_spans` and `generate`.

A prompt is either a string (raw completion, the harness default) or a list of chat messages
[{"role": "user", "content": ...}] (rendered with the model's chat template).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, Union

from ember.errors import EmberError
from ember.eval.loglikelihood import Span, encode_pair, pair_span, prefix_token_id
from ember.eval.perplexity import rolling_spans

log = logging.getLogger(__name__)

Message = Mapping[str, str]
Prompt = Union[str, Sequence[Message]]


class EvalBackendError(EmberError):
    """A backend that cannot answer as asked (unreachable server, missing tokenizer, ...)."""


@dataclass(frozen=True)
class GenerationParams:
    """Decoding settings for `generate` (greedy by default, as the harness's generate_until)."""

    max_tokens: int = 256
    temperature: float = 0.0
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int = 1234


class Backend(Protocol):
    """What tasks call; see the module docstring."""

    name: str

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]: ...

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[tuple[float, int]]: ...

    def generate(self, prompts: Sequence[Prompt], params: GenerationParams) -> list[str]: ...


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """Text up to the first occurrence of any stop string (the harness's `until`)."""
    cut = min((i for s in stop if s and (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


class TokenBackend(ABC):
    """Shared request -> Span logic for backends that know the model's tokenizer.

    Subclasses set `tokenizer` (ember Tokenizer; may be None for a generation-only HTTP
    backend), `max_len` (the most tokens one forward sees) and implement score_spans/generate.
    """

    name: str = "model"
    tokenizer = None
    max_len: int = 2048
    batch_size: int = 8
    stride: int | None = None  # rolling perplexity stride (None: disjoint windows)

    @abstractmethod
    def score_spans(self, spans: Sequence[Span]) -> list[tuple[float, bool]]:
        """(sum log-prob of each span's scored tokens, all greedy) in input order."""

    @abstractmethod
    def generate(self, prompts: Sequence[Prompt], params: GenerationParams) -> list[str]: ...

    def _need_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise EvalBackendError(f"{what} needs the model's tokenizer: pass --tokenizer DIR "
                                   "(the served model's folder)")
        return self.tokenizer

    def encode(self, text: str) -> list[int]:
        # No BOS/EOS added, as the harness's tok_encode for causal models.
        return self._need_tokenizer("tokenising").encode(text, add_special_tokens=False)

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        prefix = prefix_token_id(self._need_tokenizer("log-likelihood"))
        spans = []
        for context, continuation in requests:
            ctx, cont = encode_pair(self.encode, context, continuation, prefix)
            try:
                spans.append(pair_span(ctx, cont, self.max_len))
            except ValueError as e:
                raise EvalBackendError(f"cannot score continuation {continuation[:40]!r}: {e}") from None
        return self.score_spans(spans)

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[tuple[float, int]]:
        prefix = prefix_token_id(self._need_tokenizer("perplexity"))
        spans: list[Span] = []
        bounds: list[tuple[int, int, int]] = []  # (first span, span count, tokens) per text
        for text in texts:
            ids = self.encode(text)
            doc = rolling_spans(ids, prefix, self.max_len, self.stride) if ids else []
            bounds.append((len(spans), len(doc), len(ids)))
            spans += doc
        scores = self.score_spans(spans)
        return [(sum(ll for ll, _ in scores[first:first + n]), tokens) for first, n, tokens in bounds]

    def prompt_ids(self, prompt: Prompt, params: GenerationParams) -> list[int]:
        """Token ids of a prompt, cut from the left so that prompt + max_tokens fits max_len."""
        tok = self._need_tokenizer("token prompts")
        if isinstance(prompt, str):
            ids = self.encode(prompt)
        else:
            ids = tok.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)
        keep = self.max_len - params.max_tokens
        if keep < 1:
            raise EvalBackendError(f"max_tokens={params.max_tokens} leaves no room for a prompt in the "
                                   f"{self.max_len}-token context: lower --max-tokens")
        if len(ids) > keep:
            log.warning("prompt of %d tokens cut to its last %d to fit the context", len(ids), keep)
            ids = ids[-keep:]
        return ids
