"""A request's state inside the engine, and the vLLM-shaped outputs handed to callers.

One `Request` is one sequence being generated. A user request with n > 1 is a group: the first
sequence prefills the prompt, then `n - 1` children fork from it (sharing its KV blocks) and
each draws its own tokens. Token bookkeeping is vLLM v1's: a request knows all its token ids
(prompt + output) and how many of them have K/V in the cache (`num_computed_tokens`); the
scheduler just assigns each request some of the remaining ones per step.

    WAITING --schedule--> RUNNING --stop/length--> FINISHED_STOPPED / FINISHED_LENGTH
       ^                     |  \\--abort--> FINISHED_ABORTED
       +----preempt----------+   (blocks freed, recomputed from the prompt + output later)
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass

import torch

from ember.engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self.value in ("stop", "length", "abort")


@dataclass
class Logprob:
    """Log-probability of one token, its 1-based rank in the distribution and its text."""

    logprob: float
    rank: int
    decoded_token: str | None = None


# Per position: token id -> Logprob (the chosen token plus the top-k alternatives).
PositionLogprobs = dict[int, Logprob]


@dataclass
class RequestMetrics:
    """Wall-clock times (time.time()) and token counts of one request, for latency metrics."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    num_preemptions: int = 0


@dataclass
class CompletionOutput:
    """One generated sequence (vLLM's shape). In streamed deltas, text/token_ids/logprobs are new parts."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[PositionLogprobs] | None
    finish_reason: str | None = None  # "stop", "length" or "abort"
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """All sequences of one user request (vLLM's shape)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[PositionLogprobs | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    num_cached_tokens: int = 0


class Request:
    """One sequence: its tokens, how many have cached K/V, sampling state and metrics."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 max_tokens: int, arrival_time: float | None = None, index: int = 0,
                 group_id: str | None = None) -> None:
        self.request_id = request_id
        self.group_id = group_id if group_id is not None else request_id
        self.index = index
        self.params = params
        self.num_prompt_tokens = len(prompt_token_ids)
        self.token_ids: list[int] = list(prompt_token_ids)  # prompt + output
        self.max_tokens = max_tokens  # already capped by the model length
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.stop_reason: str | int | None = None
        self.metrics = RequestMetrics(arrival_time if arrival_time is not None else time.time(),
                                      num_prompt_tokens=len(prompt_token_ids))
        self.generator: torch.Generator | None = None  # made by the sampler for seeded requests
        self.cumulative_logprob = 0.0
        self.logprobs: list[PositionLogprobs] | None = [] if params.logprobs is not None else None
        self.prompt_logprobs: list[PositionLogprobs | None] | None = None
        if params.prompt_logprobs is not None and index == 0:
            self.prompt_logprobs = [None]  # the first token has no context to be predicted from
        self.text = ""  # detokenized output (stop strings cut), see detokenizer.py
        self.detokenizer: object | None = None
        self.block_hashes: list[bytes] = []  # hashes of the full blocks of token_ids, kv_cache.py
        self.fork_pending = params.n > 1 and index == 0  # the group's children are forked after prefill
        self.matcher: object | None = None  # llguidance.LLMatcher of a structured-outputs request (grammar.py)
        self.lora_request: object | None = None  # the LoRARequest it runs with (lora_manager.py); None: the base
        self.cache_salt = b""  # mixed into its first block's hash: prefix-cache blocks are per adapter
        self.spec_token_ids: list[int] = []  # draft tokens verified after the last token this step (spec_decode/)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def finished(self) -> bool:
        return self.status.finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None

    def append_token(self, token: int, now: float) -> None:
        self.token_ids.append(token)
        m = self.metrics
        if m.first_token_time is None:
            m.first_token_time = now
        m.last_token_time = now
        m.num_generation_tokens = self.num_output_tokens

    def fork(self, index: int) -> "Request":
        """A child sequence of an n > 1 group at this point: same tokens so far, its own draws."""
        child = Request(f"{self.group_id}#{index}", self.prompt_token_ids, self.params, self.max_tokens,
                        self.metrics.arrival_time, index=index, group_id=self.group_id)
        child.token_ids = list(self.token_ids)
        child.num_computed_tokens = self.num_computed_tokens
        child.block_hashes = list(self.block_hashes)
        child.status = self.status
        child.metrics.first_scheduled_time = self.metrics.first_scheduled_time
        child.metrics.num_cached_tokens = self.metrics.num_cached_tokens
        child.fork_pending = False
        child.lora_request, child.cache_salt = self.lora_request, self.cache_salt
        if self.matcher is not None:  # forked before the first sample: the same (empty) grammar state
            child.matcher = self.matcher.deep_copy()
        return child
