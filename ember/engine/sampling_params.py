"""SamplingParams: how one request is decoded, with vLLM's field names, defaults and checks.

    SamplingParams(temperature=0, max_tokens=32)                   # greedy
    SamplingParams(temperature=0.8, top_p=0.95, seed=7, n=2, stop=["\\n\\n"], logprobs=5)

Every bad value raises SamplingParamsError (a ValueError) naming the field, so the CLI prints
one line and the server answers 400. Order of the logits pipeline (ember/engine/sampler.py):
logit_bias, min_tokens (stop tokens masked), repetition/frequency/presence penalties,
temperature, min_p, top_k, top_p, then the draw. Logprobs are those of the raw model
distribution, before any of it (vLLM v1's default), except for a structured-outputs constraint:
its token mask comes first, before logprobs too, as in vLLM (structured_outputs.py, grammar.py).

    SamplingParams(structured_outputs=StructuredOutputsParams(json=schema))    # or a dict of its fields
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ember.engine.structured_outputs import StructuredOutputsError, StructuredOutputsParams
from ember.errors import EmberError

# Below this temperature sampling is greedy (vLLM's threshold).
GREEDY_EPS = 1e-5


class SamplingParamsError(EmberError):
    """A SamplingParams field out of its range; the message names the field and the range."""


@dataclass
class SamplingParams:
    """Decoding settings of one request (vLLM's names and defaults; see the module docstring)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: all tokens
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or output
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    max_tokens: int | None = 16  # None: until the context is full
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # top-k logprobs per generated token (plus the sampled one)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None  # a dict of its fields is converted
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.stop_strings = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        if isinstance(self.structured_outputs, dict):
            try:
                self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
            except TypeError as e:
                raise SamplingParamsError(f"invalid SamplingParams: structured_outputs: {e}") from None
            except StructuredOutputsError as e:
                raise SamplingParamsError(f"invalid SamplingParams: {e}") from None
        self._validate()
        if self.greedy:  # filters are meaningless for argmax; drop them as vLLM does
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def _validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise SamplingParamsError(f"invalid SamplingParams: {msg}")

        def is_int(x: object) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        need(is_int(self.n) and self.n >= 1, f"n must be an integer >= 1, got {self.n!r}")
        need(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        need(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        need(is_int(self.top_k) and self.top_k >= 0, f"top_k must be -1 or 0 (all tokens) or >= 1, got {self.top_k!r}")
        need(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        need(self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        need(-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        need(-2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        need(self.max_tokens is None or (is_int(self.max_tokens) and self.max_tokens >= 1),
             f"max_tokens must be an integer >= 1 (or None), got {self.max_tokens!r}")
        need(is_int(self.min_tokens) and self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens!r}")
        need(self.max_tokens is None or self.min_tokens <= self.max_tokens,
             f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        need(self.seed is None or is_int(self.seed), f"seed must be an integer, got {self.seed!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            need(value is None or (is_int(value) and value >= 0), f"{name} must be an integer >= 0, got {value!r}")
        need(all(isinstance(s, str) and s for s in self.stop_strings), "stop strings must be non-empty strings")
        need(all(is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids must be token ids >= 0")
        need(self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputsParams),
             "structured_outputs must be a StructuredOutputsParams (or a dict of its fields)")
        if self.logit_bias is not None:
            try:
                self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except (AttributeError, TypeError, ValueError):
                raise SamplingParamsError("invalid SamplingParams: logit_bias must map token ids to numbers") from None

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids named by these params must exist in the model's vocabulary."""
        ids = list(self.stop_token_ids or []) + list((self.logit_bias or {}).keys())
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            raise SamplingParamsError(f"invalid SamplingParams: token id(s) {bad[:5]} outside the vocabulary "
                                      f"of {vocab_size}")
