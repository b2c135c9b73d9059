"""What SFT and DPO share: the base model, the tuning method (LoRA, QLoRA, all weights) and the export.

    --method lora    frozen base in float32, LoRA adapters on --lora-targets (default q_proj v_proj)
    --method qlora   the base's block linears packed in NF4 with double quantization (~0.5 byte
                     per weight, ember/quant), frozen; LoRA adapters in float32 on top
    --method full    every weight trains

The tuned result is written to <out>/adapter (PEFT format, with the tokenizer, loadable by
`ember.load_model(base, adapter=...)` and by `peft`) or, for full tuning, to <out>/model (Hugging
Face layout). `--merged` also writes the base with the adapter merged in to <out>/model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, Literal, TypeVar

import torch
import torch.nn as nn

from ember.adapters.lora import LoRAConfig, apply_lora, merge_and_unload, parse_targets, trainable_summary
from ember.checkpoint.hf import load_model, save_model
from ember.checkpoint.peft import load_adapter, save_adapter
from ember.checkpoint.registry import MODEL_HELP
from ember.errors import EmberError
from ember.model.transformer import Transformer
from ember.tokenizer import Tokenizer, load_tokenizer
from ember.train.distributed import DistInfo, barrier, init_distributed, shutdown
from ember.train.loop import LossFn, TrainConfig, Trainer, TrainResult, ValFn

Method = Literal["lora", "qlora", "full"]
T = TypeVar("T")


class FinetuneError(EmberError):
    """A fine-tuning setup that cannot work (no chat template, too little data, ...)."""


@dataclass(kw_only=True)
class TuneConfig(TrainConfig):
    """Fields shared by `ember finetune` and `ember dpo` (the optimisation fields come from TrainConfig)."""

    base: Path = field(metadata={"help": MODEL_HELP})
    data: Path = field(metadata={"help": "training jsonl file"})
    val_data: Path | None = field(default=None, metadata={
        "help": "held-out jsonl file (default: hold out --val-fraction of --data)"})
    val_fraction: float = field(default=0.05, metadata={"help": "share of --data held out when no --val-data"})
    tokenizer: Path | None = field(default=None, metadata={"help": "tokenizer folder (default: --base)"})
    adapter: Path | None = field(default=None, metadata={
        "help": "a LoRA adapter to merge into the base first (e.g. the SFT adapter before DPO)"})
    method: Method = field(default="lora", metadata={"help": "lora, qlora (NF4 base) or full"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (scaling alpha / r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the adapters' input"})
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"], metadata={
        "help": "module names, one regex, or all-linear"})
    rslora: bool = field(default=False, metadata={"help": "rank-stabilised scaling alpha / sqrt(r)"})
    max_len: int = field(default=1024, metadata={"help": "tokens per example, at most (longer ones are cut)"})
    merged: bool = field(default=False, metadata={"help": "also save the base with the adapter merged, to <out>/model"})
    base_dtype: Literal["float32", "bfloat16"] = field(default="float32", metadata={
        "help": "dtype of the frozen base under lora/qlora (bfloat16 halves its memory; full always trains float32)"})
    # Fine-tuning defaults differ from pretraining's.
    lr: float = field(default=2e-4, metadata={"help": "peak learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decay (matrices only)"})
    warmup_steps: int = field(default=10, metadata={"help": "linear warmup steps"})
    max_steps: int = field(default=200, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=16, metadata={"help": "examples per optimizer step, all ranks together"})
    micro_batch_size: int = field(default=4, metadata={"help": "examples per forward pass on one rank"})
    eval_every: int = field(default=50, metadata={"help": "validate every N steps (0: only at start/end)"})
    save_every: int = field(default=100, metadata={"help": "checkpoint every N steps (0: only at the end)"})

    def lora(self) -> LoRAConfig:
        return LoRAConfig(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout,
                          targets=parse_targets(self.lora_targets), rslora=self.rslora)


def load_base(cfg: TuneConfig, device: torch.device | str = "cpu", for_training: bool = False) -> Transformer:
    """The base (DPO's reference), with --adapter merged in when given.

    For training under lora/qlora it is loaded in --base-dtype on the training device, so QLoRA
    quantizes there (a bf16 8B model fits a 24 GB GPU until it is packed); otherwise float32 on CPU.
    """
    frozen = for_training and cfg.method != "full"
    dtype = cfg.base_dtype if frozen else "float32"
    model = load_model(cfg.base, dtype=dtype, device=device if frozen else "cpu", adapter=cfg.adapter)
    return merge_and_unload(model) if cfg.adapter is not None else model


def chat_tokenizer(cfg: TuneConfig) -> Tokenizer:
    tok = load_tokenizer(cfg.tokenizer or cfg.base)
    if tok.chat_template is None:
        raise FinetuneError(f"the tokenizer in {cfg.tokenizer or cfg.base} has no chat template, which "
                            "fine-tuning renders conversations with: add chat_template.jinja to the folder")
    return tok


def pad_id(tok: Tokenizer) -> int:
    for i in (tok.pad_token_id, tok.eos_token_id):
        if i is not None:
            return i
    return 0


def quantized_base_report(model: nn.Module) -> str:
    """Bytes per weight of the NF4 block linears (packed codes + quantization constants)."""
    from ember.quant.linear import NF4Linear  # the QLoRA base; imported only when used

    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    weights = sum(m.in_features * m.out_features for m in layers)
    nbytes = sum(b.numel() * b.element_size() for m in layers for b in m.buffers())
    return (f"NF4 base: {len(layers)} linears, {weights:,} weights in {nbytes / 2**20:.2f} MiB "
            f"= {nbytes / max(weights, 1):.3f} byte/weight")


def prepare_model(model: Transformer, cfg: TuneConfig) -> Transformer:
    """Apply --method to the base in place: LoRA, NF4 + LoRA, or all weights trainable."""
    torch.manual_seed(cfg.seed)  # the adapters' initialisation follows --seed
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        if cfg.method == "qlora":
            from ember.quant.quantize import QuantConfig, quantize_model

            quantize_model(model, QuantConfig(method="nf4", double_quant=True))
            print(quantized_base_report(model), flush=True)
        apply_lora(model, cfg.lora())
    print(trainable_summary(model), flush=True)
    return model


def split_held_out(items: list[T], cfg: TuneConfig, load_val) -> tuple[list[T], list[T]]:
    """(train, val): --val-data when given, else a seeded --val-fraction of the training items."""
    if cfg.val_data is not None:
        return items, load_val(cfg.val_data)
    if not 0 <= cfg.val_fraction < 1:
        raise FinetuneError(f"--val-fraction must be in [0, 1), got {cfg.val_fraction}")
    n_val = math.ceil(len(items) * cfg.val_fraction) if len(items) > 1 else 0
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    return [items[i] for i in order[n_val:]], [items[i] for i in order[:n_val]]


def lockstep_chunks(items: Sequence[T], micro_batch: int, dist: DistInfo) -> Iterator[tuple[list[T], torch.Tensor]]:
    """This rank's share of `items` in chunks, with a mask of real (1) vs filler (0) entries.

    Every rank runs the same number of forward passes (FSDP needs them in lockstep); a rank
    that has run out repeats an item with weight 0.
    """
    per_rank = math.ceil(len(items) / dist.world)
    mine = [i * dist.world + dist.rank for i in range(per_rank)]
    for start in range(0, per_rank, micro_batch):
        idx = mine[start:start + micro_batch]
        live = torch.tensor([float(i < len(items)) for i in idx])
        yield [items[i if i < len(items) else 0] for i in idx], live


def export(cfg: TuneConfig, model: nn.Module, state: dict[str, torch.Tensor], tok: Tokenizer) -> dict[str, Path]:
    """Write the tuned result (rank 0 only): the adapter, and/or a full model (module docstring)."""
    out: dict[str, Path] = {}
    if cfg.method == "full":
        with torch.device("meta"):  # a plain skeleton: the state may come from a sharded (FSDP) run
            final = Transformer(model.config)
        final.load_state_dict(state, assign=True, strict=False)
        final.tie_weights()
        out["model"] = save_model(final, cfg.out / "model")
        tok.save(out["model"])
        return out
    out["adapter"] = save_adapter(model, cfg.out / "adapter", base_model_name_or_path=str(cfg.base), state_dict=state)
    tok.save(out["adapter"])
    if cfg.merged:
        merged = load_base(cfg)
        load_adapter(merged, out["adapter"])
        out["model"] = save_model(merge_and_unload(merged), cfg.out / "model")
        tok.save(out["model"])
    return out


@dataclass
class TuneRun(Generic[T]):
    """What a fine-tuning run starts from: data split, tokenizer, the prepared model."""

    dist: DistInfo
    tok: Tokenizer
    train: list[T]
    val: list[T]
    model: Transformer
    pad: int


@contextmanager
def tuning_run(cfg: TuneConfig, load: Callable[[Path, Tokenizer, int], list[T]], what: str,
               dist: DistInfo | None = None) -> Iterator[TuneRun[T]]:
    """Read and split the data (load(path, tok, max_len)), prepare the model; shuts down
    the process group it started."""
    own_dist = dist is None
    dist = dist or init_distributed(cfg.device)
    try:
        tok = chat_tokenizer(cfg)
        train, val = split_held_out(load(cfg.data, tok, cfg.max_len), cfg, lambda p: load(p, tok, cfg.max_len))
        if not train:
            raise FinetuneError(f"{cfg.data}: no training {what} is left after holding out {len(val)}")
        model = prepare_model(load_base(cfg, dist.device, for_training=True), cfg)
        yield TuneRun(dist, tok, train, val, model, pad_id(tok))
    finally:
        if own_dist:
            shutdown(dist)


@dataclass
class TuneResult:
    train: TrainResult
    val_before: dict[str, float]
    val_after: dict[str, float]
    outputs: dict[str, Path]  # "adapter" and/or "model" (rank 0 once finished; else empty)


def train_and_export(cfg: TuneConfig, run: TuneRun, loss_fn: LossFn, batches, val_fn: ValFn,
                     flops_per_token: float, peak_flops: float | None = None,
                     stop_at: int | None = None) -> TuneResult:
    """Run the shared training loop, then (rank 0, when finished) export the result."""
    dist = run.dist
    trainer = Trainer(run.model, cfg, loss_fn, batches, val_fn=val_fn, flops_per_token=flops_per_token,
                      run_config=dataclasses.asdict(cfg), dist=dist, peak_flops=peak_flops)
    result = trainer.fit(stop_at)
    outputs: dict[str, Path] = {}
    if result.step >= cfg.max_steps:
        state = trainer.export_state_dict()
        if dist.is_main:
            outputs = export(cfg, trainer.module, state, run.tok)
    barrier(dist)
    return TuneResult(result, result.first_val, result.val, outputs)
