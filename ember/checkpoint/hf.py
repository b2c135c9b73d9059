"""Load and save models in the Hugging Face layout (config.json + safetensors).

    model = ember.load_model("path/to/hf_dir", dtype="bfloat16")
    ember.save_model(model, "out_dir")     # transformers' from_pretrained(out_dir) loads it
    model = ember.load_model("base_dir", adapter="lora_dir")   # + a PEFT LoRA adapter

Loading builds the model on the meta device and assigns each tensor straight from the
safetensors file (one copy of the weights, never pickle), in fp32, bf16 or fp16. Single-file
and sharded (`model.safetensors.index.json`) checkpoints both load. Saving writes every file
atomically and shards above `max_shard_bytes`. A config.json with a `quantization_config`
(GPTQ, AWQ, bitsandbytes) loads through `ember.quant.checkpoint`; a quantized model's
`quantization_config` attribute is written back into config.json on save.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ember.atomic import atomic_write, atomic_write_json
from ember.checkpoint.falcon import is_falcon, state_from_falcon, state_to_falcon
from ember.checkpoint.hf_config import config_from_hf, config_to_hf
from ember.checkpoint.registry import gguf_file, resolve_model_path
from ember.errors import EmberError
from ember.jsonfile import read_json_object
from ember.model.transformer import Transformer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Buffers some exporters store that ember recomputes.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


class CheckpointError(EmberError):
    """A checkpoint folder or file that cannot be loaded as asked."""


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    return DTYPES[dtype]


def read_json(path: Path) -> dict:
    return read_json_object(path, CheckpointError, "is the folder a complete Hugging Face checkpoint?")


def model_dir(path: str | os.PathLike) -> Path:
    """The checkpoint folder, or a clear error if it is missing or not a model folder."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise CheckpointError(f"model folder {folder} does not exist")
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is a file; pass the folder that holds config.json, or a .gguf file")
    if not (folder / "config.json").exists():
        raise CheckpointError(f"{folder} has no config.json or .gguf file; is it a Hugging Face model folder?")
    return folder


def weight_files(folder: Path) -> dict[Path, list[str] | None]:
    """Map each safetensors file to the keys it holds (None: all keys of the file)."""
    if (folder / INDEX_FILE).exists():
        index = read_json(folder / INDEX_FILE)
        by_file: dict[Path, list[str] | None] = defaultdict(list)
        for key, fname in index.get("weight_map", {}).items():
            by_file[folder / fname].append(key)  # type: ignore[union-attr]
        missing = [str(p) for p in by_file if not p.exists()]
        if missing:
            raise CheckpointError(f"shard(s) listed in {folder / INDEX_FILE} are missing: {', '.join(missing)}")
        return dict(by_file)
    if (folder / SINGLE_FILE).exists():
        return {folder / SINGLE_FILE: None}
    if list(folder.glob("*.bin")) or list(folder.glob("*.pt")):
        raise CheckpointError(f"{folder} holds only pickle weights (.bin/.pt); ember loads safetensors "
                              "only — convert them with transformers' save_pretrained(safe_serialization=True)")
    raise CheckpointError(f"{folder} has no {SINGLE_FILE} or {INDEX_FILE}")


def _fmt(shape: torch.Size | tuple[int, ...]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def read_state_dict(folder: Path, expected: dict[str, torch.Tensor], dtype: torch.dtype,
                    rename: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
                    ) -> dict[str, torch.Tensor]:
    """Read the tensors named in `expected` (meta tensors giving shapes), converted to dtype.

    rename: maps the file's tensors to ember's names (Falcon's, ember/checkpoint/falcon.py); with
    it every tensor is read first, then renamed and checked.
    """
    if rename is not None:
        raw = {}
        for path, keys in weight_files(folder).items():
            try:
                with safe_open(str(path), framework="pt") as f:
                    raw.update({k: f.get_tensor(k).to(dtype) for k in (keys if keys is not None else f.keys())
                                if not k.endswith(_IGNORED_SUFFIXES)})
            except SafetensorError as e:
                raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None
        state = rename(raw)
        unknown = [k for k in state if k not in expected]
        if unknown:
            raise CheckpointError(f"checkpoint has {len(unknown)} tensor(s) the config does not describe, "
                                  f"e.g. {unknown[0]!r}")
        for key, t in state.items():
            if tuple(t.shape) != tuple(expected[key].shape):
                raise CheckpointError(f"tensor {key!r} has shape {_fmt(t.shape)} but the config expects "
                                      f"{_fmt(expected[key].shape)}")
        return state
    state: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for path, keys in weight_files(folder).items():
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in keys if keys is not None else f.keys():
                    if key.endswith(_IGNORED_SUFFIXES):
                        continue
                    if key not in expected:
                        unexpected.append(key)
                        continue
                    want = expected[key].shape
                    got = tuple(f.get_slice(key).get_shape())
                    if tuple(want) != got:
                        raise CheckpointError(f"tensor {key!r} in {path.name} has shape {_fmt(got)} "
                                              f"but the config expects {_fmt(want)}")
                    state[key] = f.get_tensor(key).to(dtype)
        except SafetensorError as e:
            raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None
        except OSError as e:
            raise CheckpointError(f"cannot read {path}: {e}") from None
    if unexpected:
        raise CheckpointError(f"checkpoint has {len(unexpected)} tensor(s) the config does not describe, "
                              f"e.g. {unexpected[0]!r}")
    return state


def load_model(path: str | os.PathLike, dtype: str | torch.dtype = "float32",
               device: str | torch.device = "cpu", adapter: str | os.PathLike | None = None,
               keep_quantized: bool = False) -> Transformer:
    """Load a Hugging Face (llama/mistral/qwen2/mixtral/falcon) or ember model folder as a Transformer.

    path may also be a GGUF file, a folder holding one, or a known model's name
    (ember/checkpoint/registry.py); GGUF weights are dequantized to dtype (ember/checkpoint/gguf.py),
    or with keep_quantized=True their Q8_0 / Q4_0 / Q4_1 blocks are kept and run as they are (the
    embedding and a tied head too), as llama.cpp runs them.
    adapter: a PEFT LoRA adapter folder to apply on top (ember/checkpoint/peft.py), unmerged.
    """
    torch_dtype = resolve_dtype(dtype)
    path = resolve_model_path(path)
    gguf_path = gguf_file(path)
    if gguf_path is not None:
        from ember.checkpoint.gguf import (
            load_gguf_model,  # needs the optional gguf package
        )

        model = load_gguf_model(gguf_path, torch_dtype, keep_quantized=keep_quantized)
        return _with_adapter(model, adapter).to(device).eval()
    folder = model_dir(path)
    hf_cfg = read_json(folder / "config.json")
    cfg = config_from_hf(hf_cfg)
    if hf_cfg.get("quantization_config"):
        from ember.quant.checkpoint import (
            load_quantized,  # only quantized checkpoints need it
        )

        model = load_quantized(folder, cfg, hf_cfg["quantization_config"], torch_dtype, device)
        return _with_adapter(model, adapter).eval()
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = dict(model.state_dict())
    rename = (lambda raw: state_from_falcon(raw, cfg)) if is_falcon(cfg) else None
    state = read_state_dict(folder, expected, torch_dtype, rename)
    optional = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    missing = sorted(set(expected) - set(state) - optional)
    if missing:
        raise CheckpointError(f"checkpoint in {folder} lacks {len(missing)} tensor(s), e.g. {missing[0]!r}")
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    return _with_adapter(model, adapter).to(device).eval()


def _with_adapter(model: Transformer, adapter: str | os.PathLike | None) -> Transformer:
    if adapter is not None:
        from ember.checkpoint.peft import load_adapter  # peft.py imports this module

        load_adapter(model, adapter)
    return model


def _dense_head(model: Transformer, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A quantized embedding / LM head (ember/quant/head.py) saved in floating point, as Hugging
    Face's formats keep them; GGUF blocks elsewhere (a GGUF loaded with keep_quantized) have no
    safetensors format and are refused."""
    from ember.quant.head import dense_head_state

    dense = dense_head_state(model)
    state = {k: v for k, v in state.items() if k not in ("model.embed_tokens.blocks", "lm_head.blocks")}
    kept = [k for k in state if k.endswith(".blocks")]
    if kept:
        raise CheckpointError(f"the model runs GGUF blocks ({kept[0]}, ...), which safetensors checkpoints do not "
                              "hold: write it with `ember export --format gguf`, or load it with "
                              "keep_quantized=False to save it dequantized")
    return {**state, **dense}


def save_model(model: Transformer, out_dir: str | os.PathLike,
               max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write config.json and safetensors weights (sharded above max_shard_bytes) atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if any(k.endswith(".blocks") for k in state):
        state = _dense_head(model, state)
    if any(".lora_A." in k for k in state):
        raise CheckpointError("the model has LoRA adapters: save them with ember.checkpoint.peft.save_adapter, "
                              "or merge them first (ember.adapters.merge_and_unload) to save a full model")
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # safetensors cannot hold shared tensors; HF re-ties
    if is_falcon(model.config):
        if getattr(model, "quantization_config", None):  # its packed q/k/v would have to become one query_key_value
            raise CheckpointError("a quantized Falcon cannot be saved in Falcon's checkpoint layout yet: quantize it "
                                  "after loading (it runs in memory, in the engine and the server) or export it "
                                  "with `ember export --format gguf`")
        state = state_to_falcon(state, model.config)
    dtype = next(iter(state.values())).dtype
    dtype_name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "float32")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        atomic_write(out / SINGLE_FILE, lambda tmp: save_file(shards[0], str(tmp), metadata=meta))
        (out / INDEX_FILE).unlink(missing_ok=True)
        names = {SINGLE_FILE}
    else:
        names = set()
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            atomic_write(out / name, lambda tmp, s=shard: save_file(s, str(tmp), metadata=meta))
            names.add(name)
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        atomic_write_json(out / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
        (out / SINGLE_FILE).unlink(missing_ok=True)
    # Weights from an earlier save with a different sharding would confuse loaders.
    for stale in out.glob("model-*-of-*.safetensors"):
        if stale.name not in names:
            stale.unlink()
    hf_cfg = config_to_hf(model.config, dtype_name)
    if getattr(model, "quantization_config", None):  # set by ember.quant on quantized models
        hf_cfg["quantization_config"] = model.quantization_config
    atomic_write_json(out / "config.json", hf_cfg)
    return out
