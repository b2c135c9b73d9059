"""Many LoRA adapters in one batch: the base matmul once for every row, then each row's low-rank
update from the adapter slot it uses (Punica's segmented gather, SGMV, in PyTorch).

The serving engine wraps every linear layer of the transformer blocks in a `BatchedLoRALinear`
once (ember/engine/lora_manager.py), with K slots of stacked adapter weights:

    a: (K, R, in)     slot k's lora_A, its first r_k rows used (R = max_lora_rank)
    b: (K, R, out)    slot k's lora_B transposed; scaling_k = alpha / r (or / sqrt(r), rsLoRA)

A step's rows are grouped by slot once (`LoRABatch.groups`, set by the engine before the
forward); every wrapped layer then computes

    y = base(x)                                   all N rows, one matmul (quantized or not)
    y[rows_k] += ((x[rows_k] @ a_k[:r].T) @ b_k[:r]) * scaling_k   for each slot k in the step

so the cost over the base is one pair of thin matmuls per adapter present, never a forward per
adapter. Rows without an adapter (the base model) are in no group. Slots that an adapter does
not target for a layer have rank 0 there and cost nothing. The update is computed in float32
as PEFT does (adapters in float32 whatever the base dtype), so a row's output equals the base
with that adapter merged, up to the order of the sums (tests/engine/test_multi_lora.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ember.adapters.lora import LoRAError, is_linear_like

# Row groups of a step: (slot, rows) where rows is a slice (contiguous rows) or an index tensor.
Groups = list[tuple[int, "slice | torch.Tensor"]]


class LoRABatch:
    """The current step's rows grouped by adapter slot; shared by every BatchedLoRALinear of a model."""

    def __init__(self) -> None:
        self.groups: Groups = []

    def set_rows(self, slot_of_row: list[int], device: torch.device) -> None:
        """Group rows by slot (-1: no adapter)."""
        rows: dict[int, list[int]] = {}
        for i, slot in enumerate(slot_of_row):
            if slot >= 0:
                rows.setdefault(slot, []).append(i)
        groups: Groups = []
        for slot, idx in rows.items():
            if idx[-1] - idx[0] + 1 == len(idx):  # contiguous: a view, no gather
                groups.append((slot, slice(idx[0], idx[-1] + 1)))
            else:
                groups.append((slot, torch.tensor(idx, device=device)))
        self.groups = groups

    def clear(self) -> None:
        self.groups = []


class BatchedLoRALinear(nn.Module):
    """A linear-like `base_layer` plus, per row, the low-rank update of the slot its request uses."""

    def __init__(self, base_layer: nn.Module, num_slots: int, max_rank: int, batch: LoRABatch) -> None:
        super().__init__()
        if not is_linear_like(base_layer):
            raise LoRAError(f"LoRA wraps linear layers, not {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.in_features: int = base_layer.in_features
        self.out_features: int = base_layer.out_features
        device = next(iter(list(base_layer.parameters()) + list(base_layer.buffers()))).device
        self.register_buffer("a", torch.zeros(num_slots, max_rank, self.in_features, device=device), persistent=False)
        self.register_buffer("b", torch.zeros(num_slots, max_rank, self.out_features, device=device),
                             persistent=False)
        self.ranks = [0] * num_slots  # 0: the slot's adapter does not touch this layer
        self.scalings = [0.0] * num_slots
        self.batch = batch

    @torch.no_grad()
    def set_slot(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None, scaling: float) -> None:
        """Put one adapter's A (r, in) and B (out, r) in `slot` (None: it does not target this layer)."""
        if a is None or b is None:
            self.ranks[slot] = 0
            return
        r = a.shape[0]
        self.a[slot, :r] = a
        self.b[slot, :r] = b.t()
        self.ranks[slot], self.scalings[slot] = r, scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        groups = self.batch.groups
        if not groups:
            return y
        if not y.is_contiguous():
            y = y.contiguous()
        x2 = x.reshape(-1, self.in_features)
        y2 = y.view(-1, self.out_features)  # (N, out), written in place
        for slot, rows in groups:
            r = self.ranks[slot]
            if r == 0:
                continue
            xs = x2[rows].float()
            # PEFT's order of operations (scaling last), so a row equals PEFT's unmerged layer
            delta = (torch.mm(torch.mm(xs, self.a[slot, :r].t()), self.b[slot, :r]) * self.scalings[slot]).to(y.dtype)
            if isinstance(rows, slice):
                y2[rows] += delta
            else:
                y2.index_add_(0, rows, delta)
        return y

    def extra_repr(self) -> str:
        return f"slots={self.a.shape[0]}, max_rank={self.a.shape[1]}"


def wrap_for_serving(model: nn.Module, num_slots: int, max_rank: int, batch: LoRABatch) -> dict[str, BatchedLoRALinear]:
    """Wrap every linear layer of the transformer blocks in place: not the embedding or LM head, and
    not MoE experts or routers (they see only the rows routed to them, so a step's row groups
    would not apply)."""
    layers: dict[str, BatchedLoRALinear] = {}
    for name, module in list(model.named_modules()):
        if ".layers." not in f".{name}" or ".block_sparse_moe." in f"{name}." or not is_linear_like(module) \
                or isinstance(module, BatchedLoRALinear):
            continue
        if any(name.startswith(done + ".") for done in layers):
            continue
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        if isinstance(owner, BatchedLoRALinear):
            continue
        if owner.__class__.__name__ == "LoRALinear":
            raise LoRAError("this model already has a LoRA adapter applied: serve the plain base model with "
                            "enable_lora (merge the adapter first, or serve it as one of the LoRA modules)")
        layer = BatchedLoRALinear(module, num_slots, max_rank, batch)
        setattr(owner, child, layer)
        layers[name] = layer
    if not layers:
        raise LoRAError("the model has no linear layers in its blocks for LoRA adapters")
    return layers
