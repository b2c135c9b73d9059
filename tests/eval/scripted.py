"""A Backend whose answers are scripted by the test, so metrics can be checked by hand."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ember.eval.backend import GenerationParams, Prompt


class ScriptedBackend:
    """loglikelihood looks the continuation up in `lls`; generate calls `reply(prompt)`;
    loglikelihood_rolling looks the text up in `rolling` ((log-likelihood, tokens) pairs).
    Every request is recorded for prompt-format checks."""

    name = "scripted"

    def __init__(self, lls: dict[str, float] | None = None, reply: Callable[[Prompt], str] | None = None,
                 rolling: dict[str, tuple[float, int]] | None = None) -> None:
        self.lls = lls if lls is not None else {}
        self.reply, self.rolling = reply, rolling or {}
        self.requests: list[tuple[str, str]] = []
        self.prompts: list[Prompt] = []
        self.params: list[GenerationParams] = []

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        self.requests += list(requests)
        return [(self.lls[cont], False) for _, cont in requests]

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[tuple[float, int]]:
        return [self.rolling[t] for t in texts]

    def generate(self, prompts: Sequence[Prompt], params: GenerationParams) -> list[str]:
        assert self.reply is not None
        self.prompts += list(prompts)
        self.params.append(params)
        return [self.reply(p) for p in prompts]
