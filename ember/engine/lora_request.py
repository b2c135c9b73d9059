"""LoRARequest: which LoRA adapter a request runs with (vLLM's shape).

    llm.generate(prompts, params, lora_request=LoRARequest("sql", 1, "runs/sql-adapter"))

`lora_int_id` names the adapter inside the engine (its slot, its cached weights and its prefix-cache
blocks); give each distinct adapter its own id, >= 1. The server assigns ids itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ember.errors import EmberError


class LoRARequestError(EmberError):
    """A LoRARequest that is malformed, or whose adapter cannot be served by this engine."""


@dataclass(frozen=True)
class LoRARequest:
    """A PEFT LoRA adapter folder, the name clients use for it and its engine-wide id."""

    lora_name: str
    lora_int_id: int
    lora_path: str | os.PathLike

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise LoRARequestError("LoRARequest needs a non-empty lora_name")
        if isinstance(self.lora_int_id, bool) or not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise LoRARequestError(f"LoRARequest {self.lora_name!r}: lora_int_id must be an int >= 1, "
                                   f"got {self.lora_int_id!r}")

    @property
    def cache_salt(self) -> bytes:
        """What the prefix cache mixes into a request's first block hash: blocks computed with one
        adapter are never reused for another adapter or the base."""
        return f"lora:{self.lora_int_id}".encode()
