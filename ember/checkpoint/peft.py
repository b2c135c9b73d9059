"""LoRA adapters in Hugging Face PEFT's format: adapter_config.json + adapter_model.safetensors.

    save_adapter(model, "out/adapter", base_model_name_or_path="runs/base")
    load_adapter(model, "out/adapter")            # wraps the layers the file names, loads A and B
    ember.load_model("runs/base", adapter="out/adapter")

Tensor names are PEFT's: `base_model.model.<module>.lora_A.weight` (r, in) and `.lora_B.weight`
(out, r), where <module> is the Hugging Face module name, which ember's modules share. So an
adapter saved here loads with `peft.PeftModel.from_pretrained(transformers_model, dir)`, and one
trained with PEFT loads here. Per-module ranks and alphas round-trip through PEFT's
rank_pattern / alpha_pattern. A Falcon model's adapters use Falcon's names (query_key_value,
dense, dense_h_to_4h, dense_4h_to_h; ember/checkpoint/falcon.py joins and splits the fused q|k|v
exactly). Only plain LoRA is read: DoRA, LoRA biases, modules_to_save and
embedding adapters are refused with an error saying so.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ember.adapters.lora import (
    LoRAError,
    freeze_all_but_adapters,
    lora_layers,
    match_targets,
    wrap_module,
)
from ember.atomic import atomic_write, atomic_write_json
from ember.checkpoint.falcon import adapter_from_falcon, adapter_to_falcon, is_falcon
from ember.checkpoint.hf import read_json

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight")


def _most_common(values: list) -> Any:
    return Counter(values).most_common(1)[0][0]


def _target_modules(model: nn.Module, names: list[str]) -> list[str]:
    """Short names (q_proj, v_proj) when they select exactly these modules, else the full names."""
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    try:
        if sorted(match_targets(model, tuple(short))) == sorted(names):
            return short
    except LoRAError:
        pass
    return sorted(names)


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, base_model_name_or_path: str | None = None,
                 state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the model's LoRA adapters in PEFT format (atomically); the base weights are not saved.

    state_dict: take the A/B tensors from this full state dict (e.g. gathered from an FSDP run)
    instead of the model's own parameters.
    """
    layers = dict(lora_layers(model))
    if not layers:
        raise LoRAError("the model has no LoRA adapters to save: apply_lora or load an adapter first")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def weight(name: str, ab: str) -> torch.Tensor:
        t = getattr(layers[name], ab).weight if state_dict is None else state_dict[f"{name}.{ab}.weight"]
        return t.detach().contiguous().cpu()

    rslora = {layer.rslora for layer in layers.values()}
    if len(rslora) > 1:
        raise LoRAError("PEFT format needs one scaling rule: all adapters must agree on rsLoRA")
    cfg = getattr(model, "config", None)
    if cfg is not None and is_falcon(cfg):
        tensors, ranks, alphas, targets = _falcon_adapter(layers, weight, cfg, next(iter(rslora)))
    else:
        tensors = {f"{_PREFIX}{name}.{ab}.weight": weight(name, ab) for name in layers for ab in ("lora_A", "lora_B")}
        ranks = {n: layer.r for n, layer in layers.items()}
        alphas = {n: layer.alpha for n, layer in layers.items()}
        targets = _target_modules(model, list(layers))
    r, alpha = _most_common(list(ranks.values())), _most_common(list(alphas.values()))
    first = next(iter(layers.values()))
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "use_rslora": rslora.pop(),
        "target_modules": targets,
        "rank_pattern": {n: v for n, v in ranks.items() if v != r},
        "alpha_pattern": {n: v for n, v in alphas.items() if v != alpha},
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "use_dora": False,
    }
    atomic_write(out / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    atomic_write_json(out / CONFIG_FILE, config)
    return out


def _falcon_adapter(layers: dict[str, Any], weight: Any, cfg: Any, rslora: bool
                    ) -> tuple[dict[str, torch.Tensor], dict[str, int], dict[str, float], list[str]]:
    """A Falcon model's LoRAs under Falcon's names: tensors, ranks, alphas, target_modules."""
    joined = adapter_to_falcon({n: (weight(n, "lora_A"), weight(n, "lora_B"), layer.scaling)
                                for n, layer in layers.items()}, cfg)
    tensors, ranks, alphas = {}, {}, {}
    for name, (a, b, scaling) in joined.items():
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = a.contiguous()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = b.contiguous()
        ranks[name] = a.shape[0]
        alphas[name] = scaling * (a.shape[0] ** 0.5 if rslora else a.shape[0])  # PEFT's scaling -> alpha
    short = Counter(n.rsplit(".", 1)[-1] for n in joined)
    # Short names select every layer's module of that name: use them only when all layers have one.
    targets = sorted(short) if all(c == cfg.num_layers for c in short.values()) else sorted(joined)
    return tensors, ranks, alphas, targets


def adapter_dir(path: str | os.PathLike) -> Path:
    """The adapter folder, or one clear error saying what is wrong with it."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise LoRAError(f"adapter folder {folder} does not exist" if not folder.exists()
                        else f"{folder} is a file; pass the folder that holds {CONFIG_FILE}")
    if not (folder / CONFIG_FILE).exists():
        raise LoRAError(f"{folder} has no {CONFIG_FILE}; is it a PEFT adapter folder?")
    if not (folder / WEIGHTS_FILE).exists():
        pickled = " (it has only adapter_model.bin: re-save it with safe_serialization=True)" \
            if (folder / "adapter_model.bin").exists() else ""
        raise LoRAError(f"{folder} has no {WEIGHTS_FILE}{pickled}")
    return folder


def _check_config(config: dict, folder: Path) -> None:
    def refuse(what: str) -> None:
        raise LoRAError(f"adapter in {folder} uses {what}, which ember does not load (plain LoRA only)")

    kind = config.get("peft_type")
    if kind != "LORA":
        raise LoRAError(f"adapter in {folder} is a {kind} adapter; ember loads LoRA adapters only")
    if config.get("use_dora"):
        refuse("DoRA")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        refuse(f"trained biases (bias={config.get('bias')!r})")
    if config.get("modules_to_save"):
        refuse(f"modules_to_save {config['modules_to_save']}")
    if config.get("fan_in_fan_out"):
        refuse("fan_in_fan_out (GPT-2 Conv1D layers)")


def _pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    # PEFT's rule: a pattern key applies to every module name it ends (as a dotted suffix / regex).
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _read_tensors(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{module: {"A": tensor, "B": tensor}} from an adapter_model.safetensors."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                m = _KEY.fullmatch(key)
                if m is None:
                    raise LoRAError(f"{path} holds {key!r}, which is not a LoRA A/B weight "
                                    "(embedding adapters and biases are not supported)")
                found.setdefault(m["module"], {})[m["ab"]] = f.get_tensor(key)
    except SafetensorError as e:
        raise LoRAError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    if not found:
        raise LoRAError(f"{path} holds no LoRA weights")
    for module, ab in found.items():
        if set(ab) != {"A", "B"}:
            raise LoRAError(f"{path} has lora_{''.join(ab)} but not both A and B for {module}")
    return found


def read_adapter(model: nn.Module, path: str | os.PathLike) -> tuple[dict[str, "AdapterTensors"], float, bool]:
    """The adapter's tensors under the model's module names, checked against the model, without
    changing it: ({module: AdapterTensors}, dropout, rslora)."""
    folder = adapter_dir(path)
    config = read_json(folder / CONFIG_FILE)
    _check_config(config, folder)
    weights = _read_tensors(folder / WEIGHTS_FILE)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    # Rank and alpha per module, resolved under the file's own module names (Falcon's, for Falcon).
    shapes = {name: (int(_pattern_value(rank_pattern, name, config.get("r", 8))),
                     float(_pattern_value(alpha_pattern, name, config.get("lora_alpha", 8)))) for name in weights}
    cfg = getattr(model, "config", None)
    if cfg is not None and is_falcon(cfg):
        converted, conv_shapes = {}, {}
        for name, ab in weights.items():
            for ember_name, ember_ab in adapter_from_falcon({name: ab}, cfg).items():
                converted[ember_name], conv_shapes[ember_name] = ember_ab, shapes[name]
        weights, shapes = converted, conv_shapes
    modules = dict(model.named_modules())
    missing = [m for m in weights if m not in modules]
    if missing:
        raise LoRAError(f"adapter in {folder} targets {missing[0]!r}, which the base model does not have: "
                        "was it trained on a different architecture?")
    out = {}
    for name, ab in weights.items():
        r, alpha = shapes[name]
        module = modules[name]
        base = module.base_layer if hasattr(module, "base_layer") else module
        want = {"A": (r, getattr(base, "in_features", None)), "B": (getattr(base, "out_features", None), r)}
        for key in ("A", "B"):
            if tuple(ab[key].shape) != want[key]:
                raise LoRAError(f"adapter in {folder}: lora_{key} of {name} has shape {tuple(ab[key].shape)}, "
                                f"expected {want[key]} (r={r}): wrong base model or corrupt config")
        out[name] = AdapterTensors(ab["A"], ab["B"], r, alpha)
    return out, float(config.get("lora_dropout") or 0.0), bool(config.get("use_rslora"))


class AdapterTensors(NamedTuple):
    """One module's LoRA: A (r, in), B (out, r), rank and alpha as the file gives them."""

    a: torch.Tensor
    b: torch.Tensor
    r: int
    alpha: float


def load_adapter(model: nn.Module, path: str | os.PathLike, trainable: bool = False) -> list[str]:
    """Wrap the layers the adapter names and load its weights; returns the module names.

    trainable=False (inference) freezes every parameter; True leaves the adapters trainable,
    to continue training them.
    """
    weights, dropout, rslora = read_adapter(model, path)
    for name, t in weights.items():
        layer = wrap_module(model, name, t.r, t.alpha, dropout, rslora)
        with torch.no_grad():
            layer.lora_A.weight.copy_(t.a)
            layer.lora_B.weight.copy_(t.b)
    if trainable:
        freeze_all_but_adapters(model)
    else:
        for p in model.parameters():
            p.requires_grad_(False)
    return list(weights)
