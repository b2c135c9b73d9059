"""LoRAManager: the engine's adapters, from disk to host memory to one of K slots, and a step's rows.

    host memory (max_cpu_loras, LRU)        slots (max_loras, LRU)           a step
    adapter files read once, as float32  -> copied into the stacked weights -> rows grouped by slot
    A and B per module                      of every BatchedLoRALinear        (adapters/batched_lora.py)

  * `load(lora_request)` (LLMEngine.add_request) reads and checks the adapter into host memory
    if it is not there: a bad folder, a rank above max_lora_rank or a module the engine cannot
    serve is an error for that request alone, before it is queued. Host memory keeps at most
    max_cpu_loras adapters, least recently used out first, but never one that an unfinished
    request still needs (those are never read from disk again: a step cannot fail on a file).
  * `admit(request, running)` (Scheduler, for each waiting request) gives the request's adapter
    a slot: already there, a free one, or the least recently used slot whose adapter no running
    request uses. When every slot is busy the request waits (others behind it may run).
  * `prepare(requests, num_tokens)` (ModelRunner, before the forward) groups the step's rows by
    slot; `clear()` after it.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from ember.adapters.batched_lora import BatchedLoRALinear, LoRABatch, wrap_for_serving
from ember.adapters.lora import LoRAError, lora_scaling
from ember.engine import native
from ember.engine.lora_request import LoRARequest, LoRARequestError
from ember.engine.request import Request


@dataclass
class AdapterWeights:
    """One adapter in host memory: per wrapped module, A (r, in), B (out, r) and the scaling."""

    request: LoRARequest
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]]


class LoRAManager:
    """See the module docstring."""

    def __init__(self, model: nn.Module, max_loras: int, max_lora_rank: int, max_cpu_loras: int) -> None:
        self.model = model
        self.max_loras, self.max_lora_rank, self.max_cpu_loras = max_loras, max_lora_rank, max_cpu_loras
        self.batch = LoRABatch()
        on_cpu = next(model.parameters()).device.type == "cpu"
        linear = native.linear if on_cpu and native.available() else None  # shared q|k|v, gate|up matmuls
        self.layers: dict[str, BatchedLoRALinear] = wrap_for_serving(model, max_loras, max_lora_rank, self.batch,
                                                                     linear)
        self.host: OrderedDict[int, AdapterWeights] = OrderedDict()  # lora_int_id -> weights, LRU first
        self.slots: list[int | None] = [None] * max_loras  # lora_int_id held by each slot
        self.slot_of: dict[int, int] = {}
        self.slot_lru: OrderedDict[int, None] = OrderedDict.fromkeys(range(max_loras))  # least recent first
        self.known: dict[int, LoRARequest] = {}  # every id seen: one id names one adapter
        self.num_disk_loads = 0
        self.num_slot_loads = 0

    # ---- requests ------------------------------------------------------------------------------
    def check(self, lr: LoRARequest) -> None:
        """Cheap checks that change nothing (the server calls this off the engine's thread)."""
        if not isinstance(lr, LoRARequest):
            raise LoRARequestError(f"lora_request must be a LoRARequest, got {type(lr).__name__}")
        seen = self.known.get(lr.lora_int_id)
        if seen is not None and (seen.lora_name, str(seen.lora_path)) != (lr.lora_name, str(lr.lora_path)):
            raise LoRARequestError(f"lora_int_id {lr.lora_int_id} already names adapter {seen.lora_name!r} "
                                   f"({seen.lora_path}); give each adapter its own id")
        if lr.lora_int_id not in self.host and not os.path.isdir(os.fspath(lr.lora_path)):
            raise LoRARequestError(f"LoRA adapter {lr.lora_name!r}: {lr.lora_path} is not a folder "
                                   "(give a PEFT adapter folder: adapter_config.json + adapter_model.safetensors)")

    def read(self, lr: LoRARequest) -> AdapterWeights:
        """Read and check an adapter folder against the served model; changes nothing."""
        from ember.checkpoint.peft import read_adapter

        try:
            tensors, _, rslora = read_adapter(self.model, lr.lora_path)
        except LoRAError as e:
            raise LoRARequestError(f"LoRA adapter {lr.lora_name!r}: {e}") from None
        modules = {}
        for name, t in tensors.items():
            if name not in self.layers:
                raise LoRARequestError(f"LoRA adapter {lr.lora_name!r} targets {name}, which multi-LoRA serving "
                                       "does not take (only the linear layers of the blocks, not MoE experts, the "
                                       "embedding or the LM head)")
            if t.r > self.max_lora_rank:
                raise LoRARequestError(f"LoRA adapter {lr.lora_name!r} has rank {t.r} on {name}, above "
                                       f"max_lora_rank {self.max_lora_rank}: raise --max-lora-rank")
            modules[name] = (t.a.float(), t.b.float(), lora_scaling(t.alpha, t.r, rslora))
        return AdapterWeights(lr, modules)

    def load(self, lr: LoRARequest, in_use: Callable[[], set[int]] = set) -> None:
        """Have `lr`'s adapter in host memory (read it unless it is); `in_use()`: ids of unfinished requests."""
        self.check(lr)
        key = lr.lora_int_id
        if key in self.host:
            self.host.move_to_end(key)
        else:
            self.host[key] = self.read(lr)
            self.known[key] = lr
            self.num_disk_loads += 1
        if len(self.host) > self.max_cpu_loras:
            busy = in_use() | {key}
            for old in [k for k in self.host if k not in busy][:len(self.host) - self.max_cpu_loras]:
                del self.host[old]

    # ---- scheduling ----------------------------------------------------------------------------
    def admit(self, req: Request, running: Iterable[Request]) -> bool:
        """Whether req can run now; gives its adapter a slot (see the module docstring)."""
        lr = req.lora_request
        if lr is None:
            return True
        key = lr.lora_int_id
        slot = self.slot_of.get(key)
        if slot is None:
            busy = {r.lora_request.lora_int_id for r in running if r.lora_request is not None}
            slot = next((s for s in self.slot_lru if self.slots[s] is None or self.slots[s] not in busy), None)
            if slot is None:
                return False
            self._fill(slot, self._weights(lr))
        self.slot_lru.move_to_end(slot)
        return True

    def _weights(self, lr: LoRARequest) -> AdapterWeights:
        w = self.host.get(lr.lora_int_id)
        if w is None:  # not reached while in_use() covers every unfinished request; kept for safety
            self.load(lr)
            w = self.host[lr.lora_int_id]
        return w

    def _fill(self, slot: int, w: AdapterWeights) -> None:
        old = self.slots[slot]
        if old is not None:
            del self.slot_of[old]
        for name, layer in self.layers.items():
            a, b, scaling = w.modules.get(name, (None, None, 0.0))
            layer.set_slot(slot, a, b, scaling)
        self.slots[slot] = w.request.lora_int_id
        self.slot_of[w.request.lora_int_id] = slot
        self.num_slot_loads += 1

    # ---- the step ------------------------------------------------------------------------------
    def prepare(self, requests: Sequence[Request], num_tokens: Sequence[int], device: torch.device) -> None:
        """Group the step's flattened rows (each request's tokens in order) by adapter slot."""
        slot_of_row: list[int] = []
        for req, n in zip(requests, num_tokens):
            lr = req.lora_request
            slot_of_row.extend([-1 if lr is None else self.slot_of[lr.lora_int_id]] * n)
        self.batch.set_rows(slot_of_row, device)

    def clear(self) -> None:
        self.batch.clear()
