"""Many LoRA adapters in one batch: the base matmul once for every row, then each row's low-rank
update from the adapter slot it uses (Punica's segmented gather, SGMV, in PyTorch).

The serving engine wraps every linear layer of the transformer blocks in a `BatchedLoRALinear`
once (ember/engine/lora_manager.py), with K slots of stacked adapter weights:

    a: (K, R, in)     slot k's lora_A in its first r_k rows, zeros after (R = max_lora_rank)
    b: (K, R, out)    slot k's lora_B transposed, times its scaling (alpha / r, or / sqrt(r))

A step's rows are grouped by slot once (`LoRABatch`, set by the engine before the forward);
every wrapped layer then computes

    y = base(x)                                   all N rows, one matmul (quantized or not)
    y[rows_k] += (x[rows_k] @ a_k.T) @ b_k        for each slot k in the step, as two batched
                                                  matmuls over the groups padded to one size

so the cost over the base is two thin batched matmuls and a gather/scatter of rows per layer,
whatever the number of adapters, never a forward per adapter. Rows without an adapter (the base
model) are in no group. A layer that no adapter in the step targets costs nothing; one that some
target computes zeros for the others (their weights there are zero). The update is computed in
float32 as PEFT does (adapters in float32 whatever the base dtype; the scaling folded into b), so
a row's output equals the base with that adapter merged, up to the order of the sums
(tests/engine/test_multi_lora.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ember.adapters.lora import LoRAError, is_linear_like
from ember.model.fused import FusedLinears, LinearFn

# Row runs are computed one by one (views, no gather) when there are at most MAX_RUNS of them and
# they average MIN_RUN_ROWS rows: below that, the batched gather/scatter costs less than the calls.
MAX_RUNS = 32
MIN_RUN_ROWS = 16
# Projections that read the same input, whose base matmuls are shared (as the plain engine fuses them).
SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))

class LoRABatch:
    """The current step's rows grouped by adapter slot; shared by every BatchedLoRALinear of a model.

    Few long runs of consecutive rows with one adapter (prefill chunks: a request's tokens are
    consecutive): `runs` = [(slot, start, end)], each a view of x and y, no gather (SGMV). Else
    one adapter in the step: `single` = (slot, rows), rows a slice when contiguous. Else the
    groups padded to the largest one, M rows each, so every layer runs two batched matmuls
    whatever the number of adapters (Punica's BGMV over segments):
        index (S * M,)  the rows of x each group position reads (pads read row 0),
        slots           the S slots (a slice when they are consecutive: no copy of their weights),
        mask (S, M, 1)  1 for real rows, 0 for pads (None without pads): pads add exact zeros.
    """

    def __init__(self) -> None:
        self.active = False
        self.single: tuple[int, slice | torch.Tensor] | None = None
        self.runs: list[tuple[int, int, int]] | None = None
        self.slot_ids: list[int] = []
        self.index: torch.Tensor | None = None
        self.slots: slice | torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self.group_rows = 0
        self.shared: list[SharedBase] = []  # their cached outputs are dropped after each step

    def set_rows(self, slot_of_row: list[int], device: torch.device) -> None:
        """Group rows by slot (-1: no adapter)."""
        self.clear()
        rows: dict[int, list[int]] = {}
        for i, slot in enumerate(slot_of_row):
            if slot >= 0:
                rows.setdefault(slot, []).append(i)
        if not rows:
            return
        self.active = True
        self.slot_ids = sorted(rows)
        runs: list[tuple[int, int, int]] = []
        for i, slot in enumerate(slot_of_row):
            if slot < 0:
                continue
            if runs and runs[-1][0] == slot and runs[-1][2] == i:
                runs[-1] = (slot, runs[-1][1], i + 1)
            else:
                runs.append((slot, i, i + 1))
        if len(runs) <= MAX_RUNS and sum(e - s for _, s, e in runs) >= MIN_RUN_ROWS * len(runs):
            self.runs = runs
            return
        if len(rows) == 1:
            slot, idx = next(iter(rows.items()))
            contiguous = idx[-1] - idx[0] + 1 == len(idx)
            self.single = (slot, slice(idx[0], idx[-1] + 1) if contiguous else torch.tensor(idx, device=device))
            return
        m = max(len(v) for v in rows.values())
        self.group_rows = m
        index, mask = [], []
        for slot in self.slot_ids:
            idx = rows[slot]
            index += idx + [0] * (m - len(idx))
            mask += [1.0] * len(idx) + [0.0] * (m - len(idx))
        self.index = torch.tensor(index, device=device)
        if 0.0 in mask:
            self.mask = torch.tensor(mask, device=device).view(len(rows), m, 1)
        lo, hi = self.slot_ids[0], self.slot_ids[-1]
        self.slots = slice(lo, hi + 1) if hi - lo + 1 == len(rows) else torch.tensor(self.slot_ids, device=device)

    def clear(self) -> None:
        self.active, self.single, self.runs, self.slot_ids = False, None, None, []
        self.index = self.slots = self.mask = None
        for shared in self.shared:
            shared.forget()


class SharedBase:
    """The base outputs of wrapped projections that read the same input (q|k|v, gate|up), computed
    by one matmul over their fused weight (ember/model/fused.py) for the first of them and handed
    to the others: the wrappers keep the plain engine's fused base matmul. Each output is handed
    out once, and only for the very same input tensor (Attention and MLP call their projections on
    one input, back to back); a projection asked again, or for another input, starts a new round.
    The fused call is made only while the fused weight is still the modules' own (FusedLinears.valid);
    otherwise each base layer runs by itself."""

    def __init__(self, fused: FusedLinears) -> None:
        self.fused = fused
        self.x: torch.Tensor | None = None
        self.outs: list[torch.Tensor | None] = []

    def output(self, x: torch.Tensor, i: int) -> torch.Tensor | None:
        if self.x is not x or self.outs[i] is None:
            if not self.fused.usable(self.fused.modules):
                return None
            self.outs, self.x = list(self.fused(x)), x
        y, self.outs[i] = self.outs[i], None
        if all(o is None for o in self.outs):
            self.forget()
        return y

    def forget(self) -> None:
        self.x, self.outs = None, []


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
        self.ranks = [0] * num_slots  # 0: the slot's adapter does not touch this layer (its a, b are zero)
        self.batch = batch
        self.shared: tuple[SharedBase, int] | None = None  # (group, this layer's output in it)

    @torch.no_grad()
    def set_slot(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None, scaling: float) -> None:
        """Put one adapter's A (r, in) and B (out, r) in `slot` (None: it does not target this layer).
        Rows past its rank stay zero, so the batched product over max_rank adds nothing for them."""
        self.a[slot].zero_()
        self.b[slot].zero_()
        if a is None or b is None:
            self.ranks[slot] = 0
            return
        r = a.shape[0]
        self.a[slot, :r] = a
        self.b[slot, :r] = b.t() * scaling
        self.ranks[slot] = r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.shared[0].output(x, self.shared[1]) if self.shared is not None else None
        if y is None:
            y = self.base_layer(x)
        batch = self.batch
        if not batch.active or not any(self.ranks[s] for s in batch.slot_ids):
            return y
        if not y.is_contiguous():
            y = y.contiguous()
        x2 = x.reshape(-1, self.in_features)
        y2 = y.view(-1, self.out_features)  # (N, out), written in place
        if batch.runs is not None:
            for slot, start, end in batch.runs:
                r = self.ranks[slot]
                if r:
                    y2[start:end] += torch.mm(torch.mm(x2[start:end].float(), self.a[slot, :r].t()),
                                              self.b[slot, :r]).to(y.dtype)
            return y
        if batch.single is not None:
            slot, rows = batch.single
            r = self.ranks[slot]
            delta = torch.mm(torch.mm(x2[rows].float(), self.a[slot, :r].t()), self.b[slot, :r]).to(y.dtype)
            if isinstance(rows, slice):
                y2[rows] += delta
            else:
                y2.index_add_(0, rows, delta)
            return y
        s, m = len(batch.slot_ids), batch.group_rows
        xs = x2.index_select(0, batch.index).float().view(s, m, self.in_features)  # (S, M, in)
        delta = torch.bmm(torch.bmm(xs, self.a[batch.slots].transpose(1, 2)), self.b[batch.slots])  # (S, M, out)
        if batch.mask is not None:
            delta.mul_(batch.mask)
        y2.index_add_(0, batch.index, delta.view(-1, self.out_features).to(y.dtype))
        return y

    def extra_repr(self) -> str:
        return f"slots={self.a.shape[0]}, max_rank={self.a.shape[1]}"


def wrap_for_serving(model: nn.Module, num_slots: int, max_rank: int, batch: LoRABatch,
                     linear: LinearFn | None = None) -> dict[str, BatchedLoRALinear]:
    """Wrap every linear layer of the transformer blocks in place: not the embedding or LM head, and
    not MoE experts or routers (they see only the rows routed to them, so a step's row groups
    would not apply). With `linear` (the engine's row-major matmul), q|k|v and gate|up of plain
    nn.Linear layers are fused first and share one base matmul (SharedBase)."""
    shared = _share_bases(model, linear, batch) if linear is not None else {}
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
        layer.shared = shared.get(id(module))
        setattr(owner, child, layer)
        layers[name] = layer
    if not layers:
        raise LoRAError("the model has no linear layers in its blocks for LoRA adapters")
    return layers


def _share_bases(model: nn.Module, linear: LinearFn, batch: LoRABatch) -> dict[int, tuple[SharedBase, int]]:
    """Fuse each block's q|k|v and gate|up base weights (when plain nn.Linear on CPU): id(module) ->
    (its SharedBase, its output's place in it), for wrap_for_serving to hand to the wrappers."""
    out: dict[int, tuple[SharedBase, int]] = {}
    for module in model.modules():
        for names in SHARED_INPUT:
            projs = tuple(module._modules.get(n) for n in names)
            if any(p is None or type(p) is not nn.Linear for p in projs):
                continue
            fused = FusedLinears.fuse(projs, linear, column_major=False)
            if fused is None:
                continue
            shared = SharedBase(fused)
            batch.shared.append(shared)
            for i, p in enumerate(projs):
                out[id(p)] = (shared, i)
    return out
