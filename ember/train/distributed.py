"""Process groups and model wrapping for `torchrun`: DDP or FSDP2, gloo on CPU, NCCL on GPU.

    dist = init_distributed("cpu")       # reads RANK/WORLD_SIZE from torchrun; world 1 otherwise
    model = wrap_model(model, "fsdp", dist)
    loss = all_reduce_mean(loss, dist)
    shutdown(dist)

A single process (no torchrun) is world size 1 and nothing is wrapped, so the training loop runs
one code path everywhere. FSDP2 (`fully_shard`) shards each transformer block and then the root
(embedding, final norm, LM head); DDP replicates and all-reduces gradients.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as torch_dist
import torch.nn as nn

from ember.errors import EmberError

Parallel = Literal["ddp", "fsdp"]


class DistributedError(EmberError):
    """A distributed setup that cannot work (e.g. batch sizes that do not divide)."""


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: its rank, the world size and its device."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DistributedError(f"device {device!r} was asked for but CUDA is not available; use --device cpu")
    return torch.device(device)


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group if there is one (env WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank if world > 1 else (dev.index or 0))
        torch.cuda.set_device(dev)
    if world > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world, local_rank, dev)


def shutdown(dist: DistInfo) -> None:
    if dist.enabled and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def barrier(dist: DistInfo) -> None:
    if dist.enabled:
        torch_dist.barrier()


def all_reduce_sum(t: torch.Tensor, dist: DistInfo) -> torch.Tensor:
    if dist.enabled:
        t = t.clone()
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor, dist: DistInfo) -> torch.Tensor:
    return all_reduce_sum(t, dist) / dist.world if dist.enabled else t


def broadcast_object(obj, dist: DistInfo):
    """Rank 0's value of a picklable object, on every rank."""
    if not dist.enabled:
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap_model(model: nn.Module, parallel: Parallel, dist: DistInfo) -> nn.Module:
    """DDP- or FSDP2-wrap the model for a multi-process run; the model itself when world is 1.

    FSDP2 changes `model` in place (its parameters become sharded DTensors) and returns it;
    DDP returns a wrapper whose `.module` is the model.
    """
    if not dist.enabled:
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [dist.device.index] if dist.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(dist.device.type, (dist.world,))
        blocks = getattr(getattr(model, "model", None), "layers", None)
        for block in blocks if blocks is not None else []:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    raise DistributedError(f"unknown parallel strategy {parallel!r}; use ddp or fsdp")


def set_grad_sync(wrapped: nn.Module, enabled: bool) -> None:
    """Skip (or restore) the gradient all-reduce / reduce-scatter on accumulation micro-steps."""
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2 module
        wrapped.set_requires_gradient_sync(enabled)
    elif hasattr(wrapped, "require_backward_grad_sync"):  # DDP
        wrapped.require_backward_grad_sync = enabled
