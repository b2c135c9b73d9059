"""The process group of a parallel engine: spawned by ember, or joined under torchrun.

    group = join_or_spawn(world=2, device, timeout_s=120, worker=(fn, args))
    group.rank, group.world, group.procs        # procs: the workers ember spawned (rank 0 only)

Spawned: rank 0 (the caller's process) starts world - 1 processes with torch.multiprocessing
(spawn context, daemonic: they go when the caller goes) and all rendezvous on a free local TCP
port. Under torchrun (env WORLD_SIZE > 1) every rank already runs; the group is joined as
ember.train.distributed does it: gloo on CPU, NCCL on GPUs. Every collective times out after
`timeout_s`, so a rank that stops answering turns into an error, not a hang.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ember.errors import EmberError
from ember.parallel.layers import CommStats


class ParallelError(EmberError):
    """A parallel setup that cannot work, or a rank that died or stopped answering."""


@dataclass
class ParallelGroup:
    """Where this process sits in a parallel engine: rank = stage * tp + tp_rank, so the ranks
    of one pipeline stage form one tensor-parallel group, and rank 0 leads stage 0."""

    rank: int
    world: int
    device: torch.device
    procs: list[mp.Process] = field(default_factory=list)  # workers this process spawned
    tp: int = 0  # tensor-parallel size (0: the whole world)
    tp_group: dist.ProcessGroup | None = None  # this stage's ranks (None: the whole world)
    comm: CommStats = field(default_factory=CommStats)  # time in the model's all-reduces

    @property
    def pp(self) -> int:
        return self.world // self.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def stage(self) -> int:
        return self.rank // self.tp

    def stage_rank(self, stage: int) -> int:
        """The rank holding this rank's tensor-parallel slice in `stage`."""
        return stage * self.tp + self.tp_rank

    def form_stages(self, tp: int) -> None:
        """Make one tensor-parallel group per pipeline stage (every rank calls this, in order)."""
        self.tp = tp
        if tp == self.world:
            return
        for stage in range(self.world // tp):
            g = dist.new_group(list(range(stage * tp, (stage + 1) * tp)))
            if stage == self.stage:
                self.tp_group = g

    def dead_worker(self) -> str | None:
        """A line naming the first spawned worker that has exited, if one has."""
        for rank, p in enumerate(self.procs, start=1):
            if p.exitcode is not None:
                return f"parallel worker rank {rank} (pid {p.pid}) exited with code {p.exitcode}"
        return None

    def close(self, wait_s: float = 10.0) -> None:
        """Wait for spawned workers to exit (after rank 0 told them to), then leave the group."""
        for p in self.procs:
            p.join(wait_s)
            if p.exitcode is None:
                p.kill()  # a worker ignores SIGTERM (rank 0 leads shutdown)
                p.join(wait_s)
        if dist.is_initialized():
            dist.destroy_process_group()


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def torchrun_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_or_spawn(world: int, device: torch.device, timeout_s: float,
                  worker: Callable[..., None], worker_args: tuple) -> ParallelGroup:
    """This process's place in a `world`-rank group (module docstring). Spawned workers run
    worker(rank, world, init_method, timeout_s, *worker_args)."""
    timeout = timedelta(seconds=timeout_s)
    if torchrun_world() > 1:
        if torchrun_world() != world:
            raise ParallelError(f"torchrun started {torchrun_world()} processes but the engine asks for "
                                f"{world} ranks: make --nproc-per-node x --nnodes equal the parallel size")
        rank = int(os.environ["RANK"])
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend_for(device), timeout=timeout)
        return ParallelGroup(rank, world, device)
    if dist.is_initialized():
        raise ParallelError("a torch.distributed process group already exists in this process: close the "
                            "other parallel engine first (LLM.close()), or run under torchrun")
    if device.type == "cuda":  # NCCL's object broadcasts stage through the current device
        torch.cuda.set_device(device)
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=worker, args=(r, world, init_method, timeout_s, *worker_args), daemon=True,
                         name=f"ember-rank{r}") for r in range(1, world)]
    for p in procs:
        p.start()
    group = ParallelGroup(0, world, device, procs)
    try:
        dist.init_process_group(backend_for(device), init_method=init_method, rank=0, world_size=world,
                                timeout=timeout)
    except Exception as e:
        dead = group.dead_worker()
        group.close(1.0)
        raise ParallelError(f"the parallel group did not form: {dead or e}") from e
    return group
