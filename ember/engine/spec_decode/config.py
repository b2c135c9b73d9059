"""SpeculativeConfig: the `--speculative-config` JSON (vLLM's shape), validated before any load.

    {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    {"method": "draft_model", "model": "path/or/known-name", "num_speculative_tokens": 4}

Every mistake (not JSON, an unknown method or key, a count out of range) is one SpeculativeConfigError
line naming the field, so `ember serve` fails before loading the model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ember.errors import EmberError

METHODS = ("ngram", "draft_model")
MAX_SPECULATIVE_TOKENS = 32  # more drafts than this only grow the verification forward


class SpeculativeConfigError(EmberError):
    """A --speculative-config / speculative_config= value that cannot be used."""


@dataclass(frozen=True)
class SpeculativeConfig:
    """Which proposer drafts, and how many tokens it drafts per step."""

    method: str
    num_speculative_tokens: int
    prompt_lookup_max: int = 4  # ngram: longest tail n-gram looked up
    prompt_lookup_min: int = 2  # ngram: shortest; a 1-token tail matches too often to be worth verifying
    model: str | None = None  # draft_model: a folder, a .gguf file or a known model name

    @classmethod
    def parse(cls, value: str | Mapping[str, Any] | "SpeculativeConfig" | None) -> "SpeculativeConfig | None":
        """A JSON object string, a dict, a SpeculativeConfig or None (speculation off)."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            if not value.strip():
                return None
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise SpeculativeConfigError(f"speculative config is not JSON ({e.msg} at char {e.pos}): "
                                             "give an object such as '{\"method\": \"ngram\", "
                                             "\"num_speculative_tokens\": 4}' (in a YAML config, quote "
                                             "it as one string)") from None
        if not isinstance(value, Mapping):
            raise SpeculativeConfigError(f"speculative config must be a JSON object, got {type(value).__name__}")
        d = dict(value)
        method = d.pop("method", None)
        if method not in METHODS:
            raise SpeculativeConfigError(f"speculative config: method must be one of {', '.join(METHODS)}, "
                                         f"got {method!r}")
        allowed = {"num_speculative_tokens"} | (
            {"prompt_lookup_max", "prompt_lookup_min"} if method == "ngram" else {"model"})
        unknown = sorted(set(d) - allowed)
        if unknown:
            raise SpeculativeConfigError(f"speculative config: unknown key(s) {', '.join(unknown)} for method "
                                         f"{method!r} (allowed: {', '.join(sorted(allowed))})")
        k = _count(d, "num_speculative_tokens", None, 1, MAX_SPECULATIVE_TOKENS)
        if method == "ngram":
            hi = _count(d, "prompt_lookup_max", 4, 1, 64)
            lo = _count(d, "prompt_lookup_min", min(2, hi), 1, 64)
            if lo > hi:
                raise SpeculativeConfigError(f"speculative config: prompt_lookup_min ({lo}) must be <= "
                                             f"prompt_lookup_max ({hi})")
            return cls(method, k, prompt_lookup_max=hi, prompt_lookup_min=lo)
        model = d.get("model")
        if not isinstance(model, str) or not model.strip():
            raise SpeculativeConfigError("speculative config: method 'draft_model' needs \"model\": a model "
                                         "folder, .gguf file or known name sharing the target's tokenizer")
        return cls(method, k, model=model)


def _count(d: dict[str, Any], name: str, default: int | None, lo: int, hi: int) -> int:
    value = d.get(name, default)
    if value is None:
        raise SpeculativeConfigError(f"speculative config: {name} is required (an integer in [{lo}, {hi}])")
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise SpeculativeConfigError(f"speculative config: {name} must be an integer in [{lo}, {hi}], got {value!r}")
    return value
