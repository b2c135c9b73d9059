"""LoRA (Hu et al. 2021) by module swap on the one Transformer: low-rank updates to frozen linears.

`apply_lora` replaces each targeted linear layer `m` by `LoRALinear(m)`, which computes

    y = m(x) + (B @ A) x * scaling,     A: (r, in) Kaiming-uniform,  B: (out, r) zero,
    scaling = alpha / r  (or alpha / sqrt(r) with rsLoRA, Kalajdzievski 2023)

exactly as Hugging Face PEFT does (same init, dropout on the adapter's input, adapters in
float32 whatever the base dtype), so adapters move between ember and PEFT unchanged
(ember/checkpoint/peft.py). The base layer can be any linear-like module with `in_features`,
`out_features` and `forward(x)` (nn.Linear, or a quantized linear for QLoRA). Every weight
but the adapters is frozen.

    apply_lora(model, LoRAConfig(r=8, alpha=16, targets=("q_proj", "v_proj")))
    print(trainable_summary(model))   # trainable params: ... || trainable%: 0.26
    with adapters_disabled(model): ref_logits = model(ids)   # the frozen base (DPO reference)
    merge_lora(model); unmerge_lora(model); merge_and_unload(model)
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Union

import torch
import torch.nn as nn

from ember.errors import EmberError

ALL_LINEAR = "all-linear"
# A target is a regular expression (matched against the full module name) when it holds any
# character a module name cannot; otherwise it is a name matched as a dotted suffix, as in PEFT.
_NAME = re.compile(r"[A-Za-z0-9_.]+")

Targets = Union[str, Sequence[str]]


class LoRAError(EmberError):
    """A LoRA request that cannot be applied (no matching module, merge into a quantized base, ...)."""


@dataclass(frozen=True)
class LoRAConfig:
    """Which layers get adapters and how big they are.

    targets: module names matched as dotted suffixes ("q_proj", "self_attn.o_proj"), one regular
    expression matched against the whole module name, or "all-linear" (every linear layer but
    the LM head, as PEFT).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] | str = ("q_proj", "v_proj")
    rslora: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.targets, list):
            object.__setattr__(self, "targets", tuple(self.targets))
        if self.r <= 0:
            raise LoRAError(f"LoRA rank r must be positive, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise LoRAError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise LoRAError("LoRA needs at least one target module (e.g. q_proj v_proj, or all-linear)")

    @property
    def scaling(self) -> float:
        return lora_scaling(self.alpha, self.r, self.rslora)


def lora_scaling(alpha: float, r: int, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def parse_targets(values: Sequence[str]) -> Targets:
    """Targets from command-line words: one regex or "all-linear" stays a string, names a tuple."""
    if len(values) == 1 and (values[0] == ALL_LINEAR or not _NAME.fullmatch(values[0])):
        return values[0]
    return tuple(values)


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear, or any module that declares in/out features (quantized linears)."""
    return isinstance(module, nn.Linear) or (
        isinstance(getattr(module, "in_features", None), int)
        and isinstance(getattr(module, "out_features", None), int))


def _device_of(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


class LoRALinear(nn.Module):
    """A linear-like `base_layer` plus a trainable low-rank update (PEFT's names and maths)."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if not is_linear_like(base_layer):
            raise LoRAError(f"LoRA wraps linear layers, not {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.in_features: int = base_layer.in_features
        self.out_features: int = base_layer.out_features
        self.r, self.alpha, self.rslora = r, float(alpha), rslora
        self.scaling = lora_scaling(alpha, r, rslora)
        device = _device_of(base_layer)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        # PEFT's (and Microsoft loralib's) init: A as nn.Linear's default, B zero, so the
        # wrapped model starts exactly at the base model.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.merged = False
        self.disabled = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.disabled or self.merged:
            return y
        a = self.lora_A.weight
        delta = self.lora_B(self.lora_A(self.lora_dropout(x.to(a.dtype)))) * self.scaling
        return (y + delta).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The update B @ A * scaling, shaped like the base weight (out, in)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    @property
    def mergeable(self) -> bool:
        """Whether the update can be folded into the base weight (a float nn.Linear, not a packed one)."""
        w = getattr(self.base_layer, "weight", None)
        return isinstance(self.base_layer, nn.Linear) and w is not None and w.is_floating_point()

    def _base_weight(self) -> torch.Tensor:
        if not self.mergeable:
            raise LoRAError(f"cannot merge a LoRA adapter into a {type(self.base_layer).__name__} base layer: "
                            "save the adapter and merge it into the full-precision base instead")
        return self.base_layer.weight

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            w = self._base_weight()
            w += self.delta_weight().to(w.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            w = self._base_weight()
            w -= self.delta_weight().to(w.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}, merged={self.merged}"


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(name, layer) for every LoRA layer, named as the module it wraps (model.layers.0.self_attn.q_proj)."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def _candidates(model: nn.Module) -> dict[str, nn.Module]:
    """Linear-like modules that could take an adapter (never the inside of a LoRA layer)."""
    out: dict[str, nn.Module] = {}
    inside_lora: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside_lora):
            continue
        if isinstance(module, LoRALinear):
            inside_lora.append(name)
        if is_linear_like(module):
            out[name] = module
    return out


def match_targets(model: nn.Module, targets: Targets) -> list[str]:
    """Names of the modules `targets` selects, PEFT's matching rules; errors if none match."""
    linear = _candidates(model)
    if isinstance(targets, str) and targets == ALL_LINEAR:
        names = [n for n in linear if n != "lm_head"]
    elif isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise LoRAError(f"LoRA target pattern {targets!r} is not a valid regular expression ({e})") from None
        names = [n for n, _ in model.named_modules() if pattern.fullmatch(n)]
    else:
        if getattr(getattr(model, "config", None), "hf_model_type", None) == "falcon":
            from ember.checkpoint.falcon import falcon_targets

            targets = falcon_targets(tuple(targets))  # query_key_value, dense, ... as Falcon names them
        names = [n for n, _ in model.named_modules()
                 if n and any(n == t or n.endswith("." + t) for t in targets)]
    wrong = [n for n in names if n not in linear]
    if wrong:
        raise LoRAError(f"LoRA target {wrong[0]!r} is a {type(model.get_submodule(wrong[0])).__name__}, "
                        "not a linear layer: target its projections (e.g. q_proj, v_proj)")
    if not names:
        short = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise LoRAError(f"LoRA targets {targets!r} match no module of the model; "
                        f"linear layers are named {', '.join(short)} (or use all-linear)")
    return names


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def wrap_module(model: nn.Module, name: str, r: int, alpha: float, dropout: float = 0.0,
                rslora: bool = False) -> LoRALinear:
    """Replace one module by a LoRALinear around it (the building block of apply_lora and loading)."""
    base = model.get_submodule(name)
    if isinstance(base, LoRALinear):
        raise LoRAError(f"{name} already has a LoRA adapter; load or apply one adapter per model")
    cfg = getattr(model, "config", None)
    if name == "lm_head" and getattr(cfg, "tie_word_embeddings", False):
        raise LoRAError("lm_head shares its weight with the embedding (tied): LoRA cannot target it")
    layer = LoRALinear(base, r, alpha, dropout, rslora)
    layer.train(base.training)  # a new module starts in training mode; keep the model's (eval: no dropout)
    _swap(model, name, layer)
    return layer


def freeze_all_but_adapters(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_A." in name or ".lora_B." in name)


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Wrap the targeted linears of `model` in place and freeze everything but the adapters.

    Returns the wrapped module names. A model that already has adapters is an error.
    """
    if any(True for _ in lora_layers(model)):
        raise LoRAError("this model already has LoRA adapters; apply LoRA once per model")
    names = match_targets(model, cfg.targets)
    for name in names:
        wrap_module(model, name, cfg.r, cfg.alpha, cfg.dropout, cfg.rslora)
    freeze_all_but_adapters(model)
    return names


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) tensors count once.

    A quantized linear keeps its weight packed in buffers; it counts as in x out weights.
    """
    trainable = total = 0
    for p in model.parameters():  # parameters() already yields a shared tensor once
        n = p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    for m in model.modules():
        if is_linear_like(m) and not isinstance(m, (nn.Linear, LoRALinear)):
            total += m.in_features * m.out_features
    return trainable, total


def trainable_summary(model: nn.Module) -> str:
    """PEFT's one-line report: trainable params: N || all params: M || trainable%: P."""
    trainable, total = parameter_counts(model)
    return (f"trainable params: {trainable:,} || all params: {total:,} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}")


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (outputs unchanged, adapters kept for unmerge)."""
    for _, layer in lora_layers(model):
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    for _, layer in lora_layers(model):
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter and put the plain base layers back: a model with no LoRA left.

    requires_grad is left as it was (the base stays frozen after LoRA training).
    """
    for name, layer in list(lora_layers(model)):
        layer.merge()
        _swap(model, name, layer.base_layer)
    return model


def merge_where_possible(model: nn.Module) -> bool:
    """Fold every adapter into full-precision base weights, so decoding runs at base-model speed.

    Over a quantized base (QLoRA) nothing is merged: the low-rank update runs beside the packed
    base layer, exactly as it was trained. Returns whether the adapters were merged.
    """
    if not all(layer.mergeable for _, layer in lora_layers(model)):
        return False
    merge_and_unload(model)
    return True


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model without its adapters (merged ones are unmerged for the duration).

    This is DPO's reference model: the same weights in memory, never a second copy.
    """
    layers = [layer for _, layer in lora_layers(model)]
    merged = [layer for layer in layers if layer.merged]
    for layer in merged:
        layer.unmerge()
    before = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, was in zip(layers, before):
            layer.disabled = was
        for layer in merged:
            layer.merge()
