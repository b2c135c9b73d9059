"""Pretraining: next-token cross-entropy on packed text from a weighted mixture of sources.

    from ember.train.pretrain import PretrainConfig, pretrain
    result = pretrain(PretrainConfig(model="quickstart-10m", tokenizer=Path("runs/tok"), max_steps=500))
    result.model_dir          # final model, Hugging Face layout, tokenizer alongside

Objective: p(token_t | token_<t), cross-entropy over every position of fixed-length windows of
the token stream (documents separated by EOS); MoE models add the router load-balancing loss.
The data is tokenized once into shards under <out>/data (reused while the sources and the
tokenizer are unchanged), mixed by token share (default 70 % prose / 30 % code) and fed by a
loader whose position is part of every checkpoint. Validation: cross-entropy and perplexity on
the held-out documents of each component, and their mixture-weighted mean (`val_loss`).

Run it as `ember pretrain --config configs/pretrain-quickstart.yaml`, or under
`torchrun --nproc_per_node K -m ember pretrain ... --parallel fsdp` for DDP / FSDP2.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ember.checkpoint.hf import CheckpointError, load_model, save_model
from ember.checkpoint.registry import resolve_model_path
from ember.config import PRESETS, ModelConfig, preset
from ember.data.loader import PackedLoader, validation_windows
from ember.data.mixture import mixture_weights, parse_mixture, prepare_mixture
from ember.data.shards import VAL_FRACTION, TokenShards
from ember.errors import EmberError
from ember.model.transformer import Transformer
from ember.tokenizer import Tokenizer, load_tokenizer
from ember.train.distributed import DistInfo, all_reduce_sum, barrier, init_distributed, shutdown
from ember.train.loop import TrainConfig, Trainer, TrainResult

log = logging.getLogger(__name__)


class PretrainError(EmberError):
    """A pretraining setup that cannot work (model/tokenizer/data mismatch)."""


@dataclass
class PretrainConfig(TrainConfig):
    """Pretrain a decoder-only model on text (next-token prediction)."""

    out: Path = field(default=Path("runs/pretrain"), metadata={
        "help": "run folder: data/, checkpoints/, metrics.jsonl, loss.png, model/ (the final model)"})
    model: str = field(default="quickstart-10m", metadata={
        "help": f"a preset ({', '.join(PRESETS)}) to train from scratch, or a model folder to continue"})
    tokenizer: Path | None = field(default=None, metadata={
        "help": "tokenizer folder (default: the model folder; required with a preset)"})
    data: list[str] = field(default_factory=lambda: ["bundled"], metadata={
        "help": "mixture items PATHS[@WEIGHT]; 'bundled' = bundled-prose@0.7 bundled-code@0.3"})
    seq_len: int = field(default=512, metadata={"help": "tokens per training sequence"})
    val_fraction: float = field(default=VAL_FRACTION, metadata={"help": "share of documents held out for validation"})
    val_sequences: int = field(default=32, metadata={"help": "validation sequences per component, at most"})
    text_field: str = field(default="text", metadata={"help": "jsonl field holding the text"})
    code_bytes: int = field(default=4_000_000, metadata={"help": "bytes of stdlib code in bundled-code"})
    data_dir: Path | None = field(default=None, metadata={"help": "token shard cache (default: <out>/data)"})
    final_model: Path | None = field(default=None, metadata={"help": "where the final model goes (default: <out>/model)"})


@dataclass
class PretrainResult:
    train: TrainResult
    model_dir: Path | None
    val_before: dict[str, float]
    val_after: dict[str, float]

    @property
    def ppl_before(self) -> float:
        return self.val_before.get("val_ppl", float("nan"))

    @property
    def ppl_after(self) -> float:
        return self.val_after.get("val_ppl", float("nan"))


def lm_loss(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy of a (B, T+1) block (+ MoE balancing loss); tokens predicted."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    cfg: ModelConfig = _unwrap(model).config
    if cfg.is_moe:
        logits, aux = model(inputs, return_aux_loss=True)
    else:
        logits, aux = model(inputs), None
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    if aux is not None:
        loss = loss + cfg.router_aux_loss_coef * aux
    return loss, targets.numel()


def _unwrap(model: nn.Module) -> nn.Module:
    while not hasattr(model, "config"):
        model = getattr(model, "_orig_mod", None) or getattr(model, "module")
    return model


def build_model(cfg: PretrainConfig, model: Transformer | None = None) -> tuple[Transformer, Tokenizer]:
    """The model to train (given, a fresh preset or a saved folder) and its tokenizer, checked to fit."""
    tok_path = cfg.tokenizer
    if model is not None:
        if tok_path is None:
            raise PretrainError("pass --tokenizer FOLDER for the model being trained")
        tok = load_tokenizer(tok_path)
    elif cfg.model in PRESETS:
        if tok_path is None:
            raise PretrainError(f"--model {cfg.model} is a preset: also pass --tokenizer FOLDER "
                                "(train one with `ember tokenizer train`)")
        tok = load_tokenizer(tok_path)
        eos = tuple(i for i in (tok.eos_token_id, tok.token_to_id("<|im_end|>")) if i is not None)
        mcfg = preset(cfg.model, vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id, eos_token_id=eos)
        torch.manual_seed(cfg.seed)
        model = Transformer(mcfg)
    else:
        folder = resolve_model_path(cfg.model)
        if not folder.exists():
            raise PretrainError(f"--model {cfg.model!r} is neither a preset ({', '.join(PRESETS)}) "
                                "nor an existing model folder or .gguf file")
        model = load_model(folder)
        tok = load_tokenizer(tok_path or folder)
    if tok.vocab_size > model.config.vocab_size:
        raise PretrainError(f"the tokenizer has {tok.vocab_size} tokens but the model's embedding has only "
                            f"{model.config.vocab_size} rows; use the tokenizer the model was built for")
    if cfg.seq_len > model.config.max_position_embeddings:
        raise PretrainError(f"--seq-len {cfg.seq_len} exceeds the model's max_position_embeddings "
                            f"{model.config.max_position_embeddings}")
    return model.float(), tok


class ValidationSet:
    """Held-out sequences per component; val_fn for the Trainer (every rank takes a slice)."""

    def __init__(self, names: list[str], seqs: list[list[np.ndarray]], weights: list[float],
                 micro_batch: int, dist: DistInfo) -> None:
        self.names, self.seqs, self.weights = names, seqs, weights
        self.micro_batch, self.dist = micro_batch, dist

    def __call__(self, model: nn.Module) -> dict[str, float]:
        out: dict[str, float] = {}
        total = 0.0
        weight_seen = 0.0
        for name, seqs, w in zip(self.names, self.seqs, self.weights):
            nll = self._component(model, seqs)
            if nll is None:
                continue
            out[f"val_loss/{name.split('-', 1)[-1]}"] = nll
            total += w * nll
            weight_seen += w
        if weight_seen:
            out["val_loss"] = total / weight_seen
            out["val_ppl"] = math.exp(min(out["val_loss"], 50.0))
        return out

    def _component(self, model: nn.Module, seqs: list[np.ndarray]) -> float | None:
        device = self.dist.device
        sums = torch.zeros(2, dtype=torch.float64, device=device)  # (nll sum, tokens)
        by_len: dict[int, list[np.ndarray]] = {}
        for s in seqs:
            by_len.setdefault(len(s), []).append(s)
        for group in by_len.values():
            # Every rank runs the same number of forward passes (FSDP needs them in lockstep);
            # a rank with nothing left re-runs a sequence with weight 0.
            per_rank = math.ceil(len(group) / self.dist.world)
            mine = [group[i * self.dist.world + self.dist.rank] if i * self.dist.world + self.dist.rank < len(group)
                    else None for i in range(per_rank)]
            for i in range(0, per_rank, self.micro_batch):
                chunk = mine[i:i + self.micro_batch]
                rows = [c if c is not None else group[0] for c in chunk]
                live = torch.tensor([c is not None for c in chunk], device=device)
                block = torch.from_numpy(np.stack(rows).astype(np.int64)).to(device)
                logits = model(block[:, :-1]).float()
                nll = F.cross_entropy(logits.transpose(1, 2), block[:, 1:], reduction="none")  # (B, T)
                sums[0] += (nll.sum(dim=1) * live).sum().double()
                sums[1] += live.sum() * nll.shape[1]
        sums = all_reduce_sum(sums, self.dist)
        return float(sums[0] / sums[1]) if sums[1] > 0 else None


def prepare_data(cfg: PretrainConfig, tok: Tokenizer, dist: DistInfo
                 ) -> tuple[PackedLoader, ValidationSet, list[float]]:
    components = parse_mixture(cfg.data)
    data_dir = cfg.data_dir or cfg.out / "data"
    if dist.is_main:  # one process tokenizes; the others wait and read its shards
        prepare_mixture(components, tok, data_dir, val_fraction=cfg.val_fraction, text_field=cfg.text_field,
                        code_bytes=cfg.code_bytes, show_progress=cfg.progress)
    barrier(dist)
    folders = [data_dir / c.name for c in components]
    train = [TokenShards(f, "train") for f in folders]
    for t in train:
        if t.vocab_size > tok.vocab_size:
            raise PretrainError(f"token shards in {t.folder} were made with a {t.vocab_size}-token vocabulary "
                                f"but the tokenizer has {tok.vocab_size}; delete {t.folder} to rebuild them")
    weights = mixture_weights(components, train)
    loader = PackedLoader(train, weights, seq_len=cfg.seq_len, micro_batch=cfg.micro_batch_size,
                          rank=dist.rank, world=dist.world, seed=cfg.seed)
    val = validation_windows([TokenShards(f, "val") for f in folders], cfg.seq_len, cfg.val_sequences)
    valset = ValidationSet([c.name for c in components], val, weights, cfg.micro_batch_size, dist)
    return loader, valset, weights


def pretrain(cfg: PretrainConfig, dist: DistInfo | None = None, peak_flops: float | None = None,
             stop_at: int | None = None, model: Transformer | None = None) -> PretrainResult:
    """Run (or resume) a pretraining run; on rank 0 the final model is saved in the HF layout.

    stop_at: stop after this step with a checkpoint (the schedule still spans max_steps), to
    continue later; no final model is exported then. model: train this freshly built model
    instead of cfg.model (e.g. the custom shapes of a scaling sweep).
    """
    own_dist = dist is None
    dist = dist or init_distributed(cfg.device)
    try:
        cfg.accum_steps(dist.world)  # a batch that does not divide fails before any tokenizing
        model, tok = build_model(cfg, model)
        loader, valset, weights = prepare_data(cfg, tok, dist)
        if dist.is_main:
            names = ", ".join(f"{n.split('-', 1)[-1]} {w:.0%}" for n, w in zip(valset.names, weights))
            print(f"pretraining {model.config.num_params() / 1e6:.1f}M parameters on {names}; "
                  f"{cfg.batch_size} x {cfg.seq_len} tokens per step, {cfg.max_steps} steps", flush=True)
        trainer = Trainer(model, cfg, lm_loss, loader, val_fn=valset,
                          flops_per_token=model.config.flops_per_token(cfg.seq_len),
                          run_config=dataclasses.asdict(cfg), dist=dist, peak_flops=peak_flops)
        result = trainer.fit(stop_at)
        finished = result.step >= cfg.max_steps
        state = trainer.export_state_dict() if finished else None
        model_dir = None
        if dist.is_main and state is not None:
            model_dir = export_final(model.config, state, tok, cfg.final_model or cfg.out / "model")
        barrier(dist)
        return PretrainResult(result, model_dir, result.first_val, result.val)
    finally:
        if own_dist:
            shutdown(dist)


def export_final(mcfg: ModelConfig, state: dict[str, torch.Tensor], tok: Tokenizer, out: Path) -> Path:
    """Save a full state dict as a Hugging Face model folder with its tokenizer."""
    with torch.device("meta"):
        final = Transformer(mcfg)
    final.load_state_dict(state, assign=True, strict=False)
    final.tie_weights()
    try:
        save_model(final, out)
    except OSError as e:
        raise CheckpointError(f"cannot write the final model to {out}: {e.strerror or e}") from None
    tok.save(out)
    return out
