"""Rank 0's runner of a parallel engine and the workers' loop.

    rank 0 (the engine)                         rank r > 0 (a worker)
    start_parallel(model, cfg)  -- spawn -->    worker_main: join, shard, serve_steps
      shard its own model                         setup = recv()  -> the same ModelRunner
    ParallelModelRunner(...)    -- setup -->      loop: step = recv(); runner.run(step)
      run(step): broadcast step, forward          (the forward's all-reduces / gathers meet
                 (collectives inside)              rank 0's inside the model)
      idle: a ping every timeout / 4          <-  keeps the workers' waits under the timeout
      close(): broadcast None                     return 0
A broadcast step is the host-side StepInputs (ember/engine/model_runner.py): token ids,
positions, block tables, blocks to zero or copy, the rows that need logits. The scheduler and
sampler run only on rank 0; every rank's block pool is laid out the same (same block ids), each
holding its own KV heads.

Failures: a collective that fails or times out, or a spawned worker found dead by the watchdog
thread, makes the runner fail with one line naming what happened (ParallelError); `on_failure`
(set by `ember serve`) is called from the watchdog so an idle server goes down too. A worker
whose rank 0 is gone exits with status 1.
"""

from __future__ import annotations

import atexit
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from ember.engine.config import EngineConfig
from ember.engine.model_runner import StepInputs
from ember.model.transformer import Transformer
from ember.parallel.group import ParallelError, ParallelGroup, join_or_spawn
from ember.parallel.pipeline import StageRunner
from ember.parallel.shard import check_splittable, shard_model

log = logging.getLogger("ember.parallel")

PING = "ping"  # an idle rank 0's heartbeat


def _send(msg: object) -> None:
    dist.broadcast_object_list([msg], src=0)


def _recv() -> object:
    box: list[object] = [None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def start_parallel(model: Transformer, cfg: EngineConfig) -> ParallelGroup:
    """Form the group and turn rank 0's `model` into its shard. Under torchrun, a rank other than
    0 serves rank 0's steps here and exits the process when rank 0 closes (SystemExit)."""
    check_splittable(model.config, cfg.tensor_parallel_size, cfg.pipeline_parallel_size, cfg.enable_expert_parallel)
    device = next(model.parameters()).device
    group = join_or_spawn(cfg.world_size, device, cfg.distributed_timeout, worker_main,
                          (model, cfg, torch.get_num_threads()))
    if group.rank != 0:  # a torchrun rank: it serves rank 0, whose SIGTERM drains and then stops it
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise SystemExit(serve_steps(model, group, cfg))
    try:
        group.form_stages(cfg.tensor_parallel_size)
        shard_model(model, group, cfg.enable_expert_parallel)
    except BaseException:
        group.close(wait_s=30.0)  # the workers refuse the same shape and exit
        raise
    return group


def worker_main(rank: int, world: int, init_method: str, timeout_s: float, model: Transformer,
                cfg: EngineConfig, threads: int) -> None:
    """A spawned worker process: join the group, serve steps, exit with serve_steps' status."""
    torch.set_num_threads(threads)
    # Rank 0 leads shutdown (its SIGTERM drains, then it says stop); a Ctrl-C reaching the whole
    # process group must not kill the workers under it mid-step.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from datetime import timedelta

    from ember.parallel.group import backend_for

    device = next(model.parameters()).device
    if device.type == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        model.to(device)
    dist.init_process_group(backend_for(device), init_method=init_method, rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    sys.exit(serve_steps(model, ParallelGroup(rank, world, device), cfg))


def serve_steps(model: Transformer, group: ParallelGroup, cfg: EngineConfig) -> int:
    """A worker rank's life: shard, build the runner rank 0 describes, run its steps until told
    to stop (0) or until rank 0 is gone (1)."""
    rank = group.rank
    try:
        group.form_stages(cfg.tensor_parallel_size)
        shard_model(model, group, cfg.enable_expert_parallel)
        num_blocks, block_size, kv_dtype, int8_activations = _recv()
        runner = StageRunner(group, model, num_blocks, block_size, kv_dtype, int8_activations)
        while True:
            step = _recv()
            if step is None:
                return 0
            if step != PING:
                runner.run(step)
    except ParallelError as e:  # a layer this rank cannot split: rank 0 refuses the same, and says so
        log.debug("parallel rank %d: %s", rank, e)
        return 1
    except (RuntimeError, ConnectionError) as e:
        log.error("parallel rank %d: rank 0 is gone or stopped answering (%s); exiting",
                  rank, str(e).splitlines()[0] if str(e) else type(e).__name__)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class ParallelModelRunner(StageRunner):
    """Rank 0's ModelRunner: every step is broadcast, then run here as on every rank."""

    def __init__(self, group: ParallelGroup, model: Transformer, num_blocks: int, block_size: int,
                 kv_dtype: torch.dtype | None, int8_activations: bool, timeout_s: float) -> None:
        super().__init__(group, model, num_blocks, block_size, kv_dtype, int8_activations)
        self.lock = threading.Lock()  # one collective sequence at a time: a step, or a ping
        self.failed: str | None = None
        self.on_failure: Callable[[str], None] | None = None
        self.last_sent = time.monotonic()
        self.interval = min(max(timeout_s / 4, 0.05), 1.0)  # pings and liveness checks while idle
        self._stop = threading.Event()
        with self.lock:
            self._broadcast((num_blocks, block_size, kv_dtype, int8_activations))
        self.watchdog = threading.Thread(target=self._watch, name="ember-parallel-watchdog", daemon=True)
        self.watchdog.start()
        # A script that never calls LLM.close(): stop the workers before multiprocessing's own exit
        # handler (registered earlier, so run later) would wait on them.
        atexit.register(self.close)

    def run(self, step: StepInputs) -> torch.Tensor | None:
        with self.lock:
            self._broadcast(step)
            try:
                return super().run(step)
            except RuntimeError as e:  # a collective inside the forward failed or timed out
                raise self._fail(e) from e
            except BaseException:  # e.g. Ctrl-C mid-step: the workers may sit in a collective, so
                # no further broadcast can match theirs; close() then waits briefly and kills them
                self.failed = self.failed or "a step was interrupted: the ranks are out of step"
                raise

    def close(self) -> None:
        """Tell the workers to stop, wait for them and leave the group (idempotent)."""
        if self._stop.is_set():
            return
        self._stop.set()
        atexit.unregister(self.close)
        with self.lock:
            if self.failed is None:
                try:
                    _send(None)
                except RuntimeError:
                    pass
        self.group.close(wait_s=10.0 if self.failed is None else 2.0)

    def _broadcast(self, msg: object) -> None:
        if self.failed is not None:
            raise ParallelError(self.failed)
        try:
            _send(msg)
        except RuntimeError as e:
            raise self._fail(e) from e
        self.last_sent = time.monotonic()

    def _fail(self, error: BaseException) -> ParallelError:
        if self.failed is None:
            time.sleep(0.2)  # a worker that just crashed: let its exit code land, it names the cause
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            self.failed = self.group.dead_worker() or f"a parallel collective failed: a rank died or stopped " \
                                                      f"answering ({first})"
        return ParallelError(self.failed)

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            dead = self.group.dead_worker()
            error: BaseException | None = ParallelError(dead) if dead else None
            if error is None and time.monotonic() - self.last_sent >= self.interval:
                with self.lock:
                    if self._stop.is_set():
                        return
                    try:
                        self._broadcast(PING)
                    except ParallelError as e:
                        error = e
            if error is not None:
                if self.failed is None:
                    self.failed = str(error)
                log.error("parallel engine failed: %s", self.failed)
                if self.on_failure is not None:
                    self.on_failure(self.failed)
                return
