"""The collectives inside a tensor-parallel model: where a rank's partial results meet.

Megatron's splits need one all-reduce after each row-parallel projection (o_proj, down_proj, an
MoE's sum over experts) and a gather of the vocab-parallel LM head's logits. They are forward hooks
on the modules that were there (nn.Linear, GGUF blocks, LoRA wrappers alike), so a shard keeps the
model's module tree and names; the vocab-parallel embedding and the expert-parallel MoE are module
swaps (their forward differs).

    add_all_reduce(block.self_attn.o_proj)   # y = sum over ranks of x_r @ W_r^T (+ bias on rank 0)
    add_logits_gather(model.lm_head, vocab)  # (N, V / world) on each rank -> (N, V) everywhere
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ember.model.transformer import MoE


@dataclass
class CommStats:
    """Seconds this rank spent in the model's all-reduces (waiting for the slowest rank included)."""

    calls: int = 0
    seconds: float = 0.0


class _AllReduce:
    def __init__(self, group: dist.ProcessGroup | None, stats: CommStats) -> None:
        self.group, self.stats = group, stats

    def __call__(self, module: nn.Module, args: object, out: object) -> object:
        start = time.perf_counter()
        dist.all_reduce(out[0] if isinstance(out, tuple) else out, group=self.group)
        self.stats.seconds += time.perf_counter() - start
        self.stats.calls += 1
        return out


def add_all_reduce(module: nn.Module, group: dist.ProcessGroup | None, stats: CommStats) -> None:
    """Sum `module`'s output (or the first element of a tuple output) over the tensor-parallel
    ranks of `group` (None: the whole world), timed into `stats`."""
    module.register_forward_hook(_AllReduce(group, stats))


class _LogitsGather:
    """Concatenate each rank's vocab slice of the logits; slices may be unequal (V not divisible),
    so each is padded to the largest before the all-gather and trimmed after."""

    def __init__(self, sizes: list[int], group: dist.ProcessGroup | None) -> None:
        self.sizes, self.group = sizes, group

    def __call__(self, module: nn.Module, args: object, y: torch.Tensor) -> torch.Tensor:
        width = max(self.sizes)
        local = y if y.shape[-1] == width else F.pad(y, (0, width - y.shape[-1]))
        parts = [torch.empty_like(local) for _ in self.sizes]
        dist.all_gather(parts, local.contiguous(), group=self.group)
        return torch.cat([p[..., :n] for p, n in zip(parts, self.sizes)], dim=-1)


def add_logits_gather(head: nn.Module, sizes: list[int], group: dist.ProcessGroup | None) -> None:
    """Make a vocab-parallel LM head return the whole vocabulary's logits on every rank of `group`."""
    head.register_forward_hook(_LogitsGather(sizes, group))


class VocabParallelEmbedding(nn.Module):
    """An embedding of which this rank holds rows [lo, hi): it looks up the ids it owns, zeros
    the others, and the all-reduce fills every row from the rank that owns it."""

    def __init__(self, inner: nn.Module, lo: int, hi: int, num_embeddings: int,
                 group: dist.ProcessGroup | None) -> None:
        super().__init__()
        self.group = group
        self.inner = inner  # nn.Embedding or GGUFEmbedding over rows lo..hi-1
        self.lo, self.hi, self.num_embeddings = lo, hi, num_embeddings

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        own = (input_ids >= self.lo) & (input_ids < self.hi)
        local = torch.where(own, input_ids - self.lo, torch.zeros_like(input_ids))
        y = self.inner(local)
        y = y * own.unsqueeze(-1).to(y.dtype)
        dist.all_reduce(y, group=self.group)
        return y

    def extra_repr(self) -> str:
        return f"rows {self.lo}..{self.hi - 1} of {self.num_embeddings}"


class ExpertParallelMoE(MoE):
    """Mixtral's MoE of which this rank holds some experts: the router (replicated) picks the
    top-k experts of every token as on one device, this rank runs its experts on the tokens routed
    to them, and the all-reduce hook sums the ranks' contributions (each token's k expert outputs
    live on the ranks that own those experts)."""

    local_experts: frozenset[int] = frozenset()

    def runs_expert(self, e: int) -> bool:
        return e in self.local_experts
