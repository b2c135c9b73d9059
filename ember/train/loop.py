"""THE training loop, shared by pretraining and fine-tuning: one step, evaluation, checkpoints.

    trainer = Trainer(model, cfg, loss_fn, batches, val_fn=val_fn, flops_per_token=f)
    result = trainer.fit()

What differs between pretraining, SFT, DPO or LoRA is only what goes in:
  loss_fn(model, batch) -> (mean loss tensor, tokens processed[, {name: float}])   the objective;
                            named metrics (DPO's rewards/*) are averaged over the step's
                            micro-batches and ranks and logged with the step
  batches: BatchSource   next_batch() / state_dict() / load_state_dict()   this rank's micro-batches
  val_fn(model) -> {"val_loss": ..., ...}   held-out metrics (called on every rank; reduce inside)
  the model: any nn.Module; parameters with requires_grad=False are not optimised (LoRA)

One optimizer step = `accum` micro-batches per rank, accum = batch_size / (micro_batch_size *
world), gradients averaged over all of them. Then: gradient clipping, non-finite check (skip the
step; stop after max_bad_steps in a row), AdamW with the warmup + cosine schedule. Every step logs
loss, lr, grad norm, tokens/s and MFU to metrics.jsonl and the progress bar; every eval_every
steps val_fn runs; every save_every steps an atomic checkpoint is written (ember/train/checkpoint.py).
Resuming from it reproduces the uninterrupted run bitwise on CPU.

Under `torchrun` the same code runs DDP or FSDP2 (`parallel`); see ember/train/distributed.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import torch.nn as nn
from tqdm import tqdm

from ember.errors import EmberError
from ember.train.checkpoint import TrainCheckpoints
from ember.train.distributed import (DistInfo, DistributedError, Parallel, all_reduce_sum, barrier,
                                     broadcast_object, init_distributed, set_grad_sync, wrap_model)
from ember.train.metrics import MetricsLog, matmul_peak_flops, plot_loss_curve
from ember.train.optim import build_adamw, lr_at

log = logging.getLogger(__name__)


class TrainingError(EmberError):
    """Training cannot go on (e.g. the loss kept being non-finite)."""


@dataclass
class TrainConfig:
    """Optimisation, precision, evaluation and checkpointing of one training run."""

    out: Path = field(default=Path("runs/train"), metadata={
        "help": "run folder: checkpoints/, metrics.jsonl, loss.png, the final model"})
    max_steps: int = field(default=1000, metadata={"help": "optimizer steps (the schedule's length)"})
    batch_size: int = field(default=32, metadata={"help": "sequences per optimizer step, all ranks together"})
    micro_batch_size: int = field(default=8, metadata={
        "help": "sequences per forward pass on one rank (gradient accumulation makes up the rest)"})
    lr: float = field(default=6e-4, metadata={"help": "peak learning rate"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine decays to this fraction of --lr"})
    warmup_steps: int = field(default=100, metadata={"help": "linear warmup steps"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW decay (matrices only)"})
    adam_betas: tuple[float, float] = field(default=(0.9, 0.95), metadata={"help": "AdamW betas"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global gradient norm (0: off)"})
    dtype: Literal["auto", "float32", "bfloat16"] = field(default="auto", metadata={
        "help": "compute dtype: auto = bf16 autocast on GPUs that support it, fp32 on CPU"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    parallel: Literal["ddp", "fsdp"] = field(default="ddp", metadata={
        "help": "under torchrun: DDP (replicate) or FSDP2 (shard parameters, grads, optimizer)"})
    eval_every: int = field(default=100, metadata={"help": "validate every N steps (0: only at start/end)"})
    save_every: int = field(default=100, metadata={"help": "checkpoint every N steps (0: only at the end)"})
    keep_last: int = field(default=3, metadata={"help": "checkpoints to keep"})
    max_bad_steps: int = field(default=5, metadata={"help": "stop after this many non-finite steps in a row"})
    resume: bool = field(default=True, metadata={"help": "continue from the newest checkpoint in --out"})
    seed: int = field(default=0, metadata={"help": "random seed (initialisation, data order)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def accum_steps(self, world: int) -> int:
        per_step = self.micro_batch_size * world
        if self.micro_batch_size <= 0 or self.batch_size <= 0 or self.batch_size % per_step:
            raise DistributedError(f"batch_size {self.batch_size} must be a positive multiple of "
                                   f"micro_batch_size {self.micro_batch_size} x {world} process(es)")
        return self.batch_size // per_step

    def autocast_dtype(self, device: torch.device) -> torch.dtype | None:
        if self.dtype == "bfloat16":
            return torch.bfloat16
        if self.dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None


LossFn = Callable[[nn.Module, Any], "tuple[torch.Tensor, int]"]
ValFn = Callable[[nn.Module], "dict[str, float]"]


class BatchSource(Protocol):
    """This rank's micro-batches, with a position that checkpoints restore exactly."""

    def next_batch(self) -> Any: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class TrainResult:
    step: int
    loss: float | None
    val: dict[str, float]
    first_val: dict[str, float]
    skipped_steps: int
    metrics: Path


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


class Trainer:
    """Runs TrainConfig's optimisation of `model` on `loss_fn` over `batches` (module docstring)."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, loss_fn: LossFn, batches: BatchSource, *,
                 val_fn: ValFn | None = None, flops_per_token: float | None = None,
                 run_config: dict[str, Any] | None = None, dist: DistInfo | None = None,
                 peak_flops: float | None = None) -> None:
        self.cfg = cfg
        self.dist = dist or init_distributed(cfg.device)
        self.accum = cfg.accum_steps(self.dist.world)
        self.loss_fn, self.batches, self.val_fn = loss_fn, batches, val_fn
        self.flops_per_token = flops_per_token
        self.run_config = run_config if run_config is not None else dataclasses.asdict(cfg)
        self.device = self.dist.device
        self.amp_dtype = cfg.autocast_dtype(self.device)
        self.module = model.to(self.device)  # the plain model: state dicts, export
        self.wrapped = wrap_model(self.module, cfg.parallel, self.dist)  # what gets gradients synced
        self.optimizer = build_adamw(self.module, cfg.lr, cfg.weight_decay, tuple(cfg.adam_betas))
        self.forward_model = torch.compile(self.wrapped) if cfg.compile else self.wrapped
        self.ckpts = TrainCheckpoints(cfg.out / "checkpoints", self.dist, cfg.keep_last)
        self.metrics = MetricsLog(cfg.out / "metrics.jsonl")
        self.peak_flops = peak_flops
        self._peak_fixed = peak_flops
        self.step = 0
        self.step_metrics: dict[str, float] = {}  # the loss_fn's named metrics of the last step
        self.tokens = 0
        self.skipped = 0
        self.bad_in_row = 0
        self.first_val: dict[str, float] = {}
        self.last_val: dict[str, float] = {}

    # ---- helpers -------------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _trainer_state(self) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens, "skipped": self.skipped, "bad_in_row": self.bad_in_row,
                "data": self.batches.state_dict(), "first_val": self.first_val, "last_val": self.last_val,
                "world": self.dist.world, "schedule": {"step": self.step, "lr": self._lr(self.step)},
                "config": _jsonable(self.run_config)}

    def _lr(self, step: int) -> float:
        c = self.cfg
        return lr_at(step, peak=c.lr, warmup=c.warmup_steps, total=c.max_steps, min_ratio=c.min_lr_ratio)

    def save(self) -> Path:
        return self.ckpts.save(self.step, self.module, self.optimizer, self._trainer_state())

    def resume(self) -> bool:
        """Restore the newest valid checkpoint in cfg.out, if resuming and there is one."""
        existing = broadcast_object(bool(self.ckpts.complete()) if self.dist.is_main else None, self.dist)
        if not existing:
            return False
        if not self.cfg.resume:
            raise TrainingError(f"{self.cfg.out} already holds checkpoints of an earlier run; pass --resume "
                                "to continue it or choose another --out")
        found = self.ckpts.restore(self.module, self.optimizer)
        if found is None:
            return False
        folder, state = found
        self.batches.load_state_dict(state["data"])
        self.step, self.tokens, self.skipped = state["step"], state["tokens"], state["skipped"]
        self.bad_in_row = state.get("bad_in_row", 0)
        self.first_val, self.last_val = state.get("first_val", {}), state.get("last_val", {})
        if self.dist.is_main:
            self.metrics.truncate_after(self.step)
            changed = _changed_keys(state.get("config", {}), _jsonable(self.run_config))
            if changed:
                log.warning("resuming with changed settings: %s", ", ".join(changed))
            print(f"resumed from {folder} (step {self.step})", flush=True)
        return True

    def evaluate(self) -> dict[str, float]:
        """val_fn under eval mode, no grad and the training autocast; {} without a val_fn."""
        if self.val_fn is None:
            return {}
        self.module.eval()
        try:
            with torch.no_grad(), self.autocast():
                return dict(self.val_fn(self.forward_model))
        finally:
            self.module.train()

    def export_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The full (unsharded) model state dict on rank 0 (None on other ranks)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if self.dist.enabled:
            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            sd = get_model_state_dict(self.module, options=opts)
            return sd if self.dist.is_main else None
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()}

    # ---- the loop ------------------------------------------------------------------------------
    def _measure_peak(self) -> float:
        """Sum over ranks of each device's matmul peak: measured at start and again at every
        evaluation, keeping the highest (a peak measured while a shared machine was busy would
        overstate MFU). A peak given to the constructor is used as it is."""
        if self._peak_fixed is None:
            barrier(self.dist)
            measured = matmul_peak_flops(self.device, self.amp_dtype or torch.float32, seconds=0.5)
            self.peak_flops = max(self.peak_flops or 0.0, measured)
        total = all_reduce_sum(torch.tensor([self.peak_flops], dtype=torch.float64), self.dist)
        return float(total.item())

    def train_step(self) -> tuple[float, float, int]:
        """One optimizer step (accum micro-batches per rank); returns (mean loss, grad norm, global tokens).

        fit() drives it; benchmarks call it directly to time steps without evaluation or checkpoints.
        """
        lr = self._lr(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        tokens = 0
        named: dict[str, float] = {}
        for m in range(self.accum):
            batch = to_device(self.batches.next_batch(), self.device)
            set_grad_sync(self.wrapped, m == self.accum - 1)
            with self.autocast():
                loss, n, *extra = self.loss_fn(self.forward_model, batch)
            for k, v in (extra[0] if extra else {}).items():
                named[k] = named.get(k, 0.0) + float(v) / self.accum
            (loss / self.accum).backward()
            loss_sum += loss.detach().double()
            tokens += int(n)
        stats = all_reduce_sum(torch.stack([loss_sum / self.accum, torch.tensor(float(tokens), dtype=torch.float64,
                                                                                device=self.device)]), self.dist)
        mean_loss = float(stats[0]) / self.dist.world
        if named:
            means = all_reduce_sum(torch.tensor(list(named.values()), dtype=torch.float64, device=self.device),
                                   self.dist) / self.dist.world
            named = dict(zip(named, means.tolist()))
        self.step_metrics = named
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if math.isfinite(mean_loss) and math.isfinite(norm):
            self.optimizer.step()
            self.bad_in_row = 0
        else:
            self.skipped += 1
            self.bad_in_row += 1
        self.optimizer.zero_grad(set_to_none=True)
        return mean_loss, norm, int(stats[1])

    def fit(self, stop_at: int | None = None) -> TrainResult:
        """Train to cfg.max_steps (or stop after step stop_at), resuming first if asked."""
        cfg, main = self.cfg, self.dist.is_main
        if main:
            cfg.out.mkdir(parents=True, exist_ok=True)
        self.module.train()
        resumed = self.resume()
        peak = self._measure_peak()
        if not resumed:
            self.first_val = self.last_val = self.evaluate()
            if main:
                self.metrics.truncate_after(-1)
                if self.first_val:
                    self.metrics.write({"step": 0, "tokens": 0, **self.first_val})
        start = self.step
        end = cfg.max_steps if stop_at is None else min(cfg.max_steps, stop_at)
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not (main and cfg.progress), unit="step",
                   dynamic_ncols=True, leave=False)
        loss = None
        saved_at = -1
        try:
            while self.step < end:
                t0 = time.perf_counter()
                loss, norm, tokens = self.train_step()
                dt = time.perf_counter() - t0
                lr = self._lr(self.step)
                self.step += 1
                self.tokens += tokens
                tok_s = tokens / dt
                record = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": norm, "tokens": self.tokens,
                          "tok_per_s": tok_s, "step_time": dt, **self.step_metrics}
                if self.flops_per_token:
                    record["mfu"] = self.flops_per_token * tok_s / peak
                if self.bad_in_row:
                    record["skipped"] = True
                if main:
                    self.metrics.write(record)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}", gnorm=f"{norm:.2f}", tok_s=f"{tok_s:.0f}",
                                    mfu=f"{record.get('mfu', 0):.0%}", refresh=False)
                if self.bad_in_row >= cfg.max_bad_steps:
                    raise TrainingError(f"the loss or gradient was non-finite for {self.bad_in_row} steps in a row "
                                        f"(up to step {self.step}); lower --lr or check the data; the last good "
                                        f"checkpoint is in {self.ckpts.root}")
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.max_steps:
                    self._log_eval(bar)
                    peak = self._measure_peak()
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self.save()
                    saved_at = self.step
        finally:
            bar.close()
        if self.step > start:  # (a run resumed at its end has nothing left to do)
            if self.step >= cfg.max_steps:
                self._log_eval(bar)
            if saved_at != self.step:
                self.save()
        if main:
            plot_loss_curve(self.metrics.path, cfg.out / "loss.png")
        return TrainResult(self.step, loss, self.last_val, self.first_val, self.skipped, self.metrics.path)

    def _log_eval(self, bar: tqdm) -> None:
        self.last_val = self.evaluate()
        if self.last_val and self.dist.is_main:
            self.metrics.write({"step": self.step, "tokens": self.tokens, **self.last_val})
            shown = ", ".join(f"{k} {v:.4g}" for k, v in self.last_val.items() if "/" not in k)
            bar.write(f"step {self.step}: {shown}")
            plot_loss_curve(self.metrics.path, self.cfg.out / "loss.png")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (int, float, str, bool)) or obj is None:
        return obj
    return str(obj)


def _changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    ignore = {"resume", "progress", "max_steps"}
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if k not in ignore and old.get(k) != new.get(k)]


__all__ = ["BatchSource", "LossFn", "Parallel", "TrainConfig", "TrainResult", "Trainer", "TrainingError",
           "ValFn", "to_device"]
