"""Load a GGUF file (llama.cpp's format) as ember's Transformer, read through the `gguf` package.

    model = ember.load_model("model.gguf")                 # or a folder holding one .gguf
    model = ember.load_model("smollm2-135m-instruct")      # a known model's installed GGUF

What the file holds and how it maps onto a ModelConfig and Hugging Face tensor names:
  * hyperparameters under `<arch>.*` keys (block_count, embedding_length, attention.head_count,
    rope.freq_base, ...); architectures `llama`, `qwen2` (q/k/v bias), `gemma3` (Gemma 3's
    block, ember/checkpoint/gemma.py; every 6th layer global as llama.cpp has it; llama.cpp
    stores its (1 + weight) norms as 1 + weight, so 1 is subtracted back) and `falcon` (the
    parallel block, one LayerNorm or, with attn_norm_2, the new decoder architecture's two:
    attn_norm_2 feeds attention and attn_norm the MLP; RoPE rotate-half; exact GELU, as
    transformers runs it);
  * tensors under llama.cpp's names (token_embd, blk.N.attn_q, ...), matched to ember's
    state_dict keys through gguf's own HF -> GGUF name map (Falcon's through its HF names,
    ember/checkpoint/falcon.py); no `output.weight` means the LM head is tied to the embeddings;
  * Falcon's attn_qkv is q, k and v stacked in that order (llama.cpp's converter regroups HF's
    per-KV-group rows so), split by rows into q_proj / k_proj / v_proj;
  * `llama` q/k rows in llama.cpp's interleaved-pairs RoPE order, put back into Hugging Face's
    rotate-half order (the inverse of what llama.cpp's converter and ember's export do);
    `qwen2` rotates NeoX-style and stores them unchanged;
  * quantized blocks (Q8_0, Q4_K, ...) dequantized by gguf's numpy dequantizers to fp32, then cast
    to the requested dtype.
The tokenizer in the same file is read by ember/tokenizer/gguf.py.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ember.checkpoint.falcon import falcon_name
from ember.checkpoint.hf import CheckpointError
from ember.config import ConfigError, ModelConfig, RopeScaling
from ember.errors import EmberError
from ember.model.transformer import Transformer

ARCHITECTURES = ("llama", "qwen2", "gemma3", "falcon")
_NAME_MAPS = {"llama": "LLAMA", "qwen2": "QWEN2", "gemma3": "GEMMA3", "falcon": "FALCON"}  # gguf.MODEL_ARCH members
GEMMA3_SLIDING_PATTERN = 6  # llama.cpp's Gemma 3: layers 6, 12, ... attend globally, the rest locally
# Tensor types ember dequantizes (everything gguf's numpy code reads that llama.cpp's common
# quantization presets produce); the i-quants and ternary types are refused by name.
TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

log = logging.getLogger(__name__)


class GGUFError(CheckpointError):
    """A GGUF file that cannot be loaded as asked (unreadable, unsupported architecture or type)."""


def gguf_module(error: type[EmberError] = GGUFError):
    try:
        import gguf
    except ImportError:
        raise error("reading GGUF files needs the gguf package: pip install 'ember[quant]'") from None
    return gguf


def open_gguf(path: Path, error: type[EmberError] = GGUFError):
    """A gguf.GGUFReader over `path`, or one line (as `error`) saying the file is not a readable GGUF."""
    gguf = gguf_module(error)
    if not path.is_file():
        raise error(f"no GGUF file at {path}: check the path")
    try:
        return gguf.GGUFReader(str(path), "r")
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror or e}") from None
    except Exception as e:  # noqa: BLE001  the reader raises ValueError/IndexError/struct errors on bad bytes
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise error(f"{path} is not a readable GGUF file (truncated or corrupt?): {reason}") from None


def field_value(reader, key: str, default: Any = None) -> Any:
    """A metadata value (scalar, string or list), or `default` when the key is absent.

    float32 values come back as their shortest decimal (1e-05, not 9.999999747378752e-06), the
    number the model's author wrote.
    """
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    if field.types == [gguf_module().GGUFValueType.FLOAT32]:
        return float(str(np.float32(value)))
    return value


def architecture(reader, path: Path) -> str:
    arch = field_value(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{path.name}: unsupported GGUF architecture {arch!r}; ember loads "
                        f"{', '.join(ARCHITECTURES)}")
    return arch


def _rope_scaling(reader, arch: str, path: Path) -> RopeScaling:
    kind = field_value(reader, f"{arch}.rope.scaling.type", "none")
    if kind in ("none", None):
        return RopeScaling()
    if kind != "linear":
        raise GGUFError(f"{path.name}: unsupported RoPE scaling type {kind!r} (ember reads none and linear)")
    return RopeScaling(rope_type="linear", factor=float(field_value(reader, f"{arch}.rope.scaling.factor", 1.0)))


def config_from_gguf(reader, path: Path) -> ModelConfig:
    """The ModelConfig that the GGUF's `<arch>.*` metadata and tensors describe."""
    arch = architecture(reader, path)
    tensors = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in tensors:
        raise GGUFError(f"{path.name} carries per-dimension RoPE frequency factors (rope_freqs, Llama 3.1 "
                        "style), which ember does not read from GGUF yet: load the Hugging Face folder instead")

    def need(key: str) -> Any:
        value = field_value(reader, f"{arch}.{key}")
        if value is None:
            raise GGUFError(f"{path.name} lacks the metadata key {arch}.{key}")
        return value

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = int(field_value(reader, f"{arch}.attention.key_length", hidden // heads))
    rope_dims = int(field_value(reader, f"{arch}.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise GGUFError(f"{path.name} rotates {rope_dims} of {head_dim} head dimensions (partial RoPE), "
                        "which ember does not support")
    embed = tensors.get("token_embd.weight")
    if embed is None:
        raise GGUFError(f"{path.name} has no token_embd.weight tensor")
    vocab = int(field_value(reader, f"{arch}.vocab_size", int(embed.shape[1])))
    eos = field_value(reader, "tokenizer.ggml.eos_token_id")
    extra: dict[str, Any] = {}
    eps_key = "attention.layer_norm_rms_epsilon"
    if arch == "falcon":  # llama.cpp's Falcon is always the parallel block (no ALiBi, no Falcon-RW)
        eps_key = "attention.layer_norm_epsilon"
        bias = "blk.0.attn_output.bias" in tensors
        extra = dict(norm="layernorm", gated_mlp=False, mlp_act="gelu", parallel_attn=True,
                     parallel_mlp_norm="blk.0.attn_norm_2.weight" in tensors, linear_bias=bias, attention_bias=bias,
                     rope_theta=float(field_value(reader, f"{arch}.rope.freq_base", 10000.0)))
    elif arch == "gemma3":
        layers = int(need("block_count"))
        cap = field_value(reader, f"{arch}.final_logit_softcapping")
        extra = dict(norm="rms_offset", mlp_act="gelu_tanh", qk_norm=True, sandwich_norm=True, embed_scale=True,
                     attn_scale=head_dim ** -0.5, sliding_window=int(need("attention.sliding_window")),
                     layer_types=tuple("sliding_attention" if (i + 1) % GEMMA3_SLIDING_PATTERN else "full_attention"
                                       for i in range(layers)),
                     local_rope_theta=float(field_value(reader, f"{arch}.rope.local.freq_base", 10000.0)),
                     final_logit_softcapping=None if cap is None else float(cap), hf_model_type="gemma3_text")
        end_of_turn = _token_id(reader, "<end_of_turn>")
        if end_of_turn is not None and eos is not None and end_of_turn != int(eos):
            eos = [int(eos), end_of_turn]  # a chat turn ends there (Gemma's generation_config stops on both)
    try:
        return ModelConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=int(need("feed_forward_length")),
            num_layers=int(need("block_count")),
            num_heads=heads,
            num_kv_heads=int(field_value(reader, f"{arch}.attention.head_count_kv", heads)),
            head_dim=head_dim,
            max_position_embeddings=int(field_value(reader, f"{arch}.context_length", 2048)),
            rms_norm_eps=float(need(eps_key)),
            rope_scaling=_rope_scaling(reader, arch, path),
            tie_word_embeddings="output.weight" not in tensors,
            bos_token_id=field_value(reader, "tokenizer.ggml.bos_token_id"),
            eos_token_id=() if eos is None else tuple(int(e) for e in (eos if isinstance(eos, list) else [eos])),
            **{"hf_model_type": arch, "attention_bias": arch == "qwen2",
               "rope_theta": float(field_value(reader, f"{arch}.rope.freq_base", 10000.0)), **extra},
        )
    except ConfigError as e:
        raise GGUFError(f"{path.name}: {e}") from None


def _token_id(reader, token: str, within: int = 1024) -> int | None:
    """The id of `token` among the first `within` vocabulary entries (control tokens come first),
    without decoding the whole vocabulary."""
    field = reader.fields.get("tokenizer.ggml.tokens")
    if field is None:
        return None
    want = token.encode()
    for i, part in enumerate(field.data[:within]):
        if bytes(field.parts[part]) == want:
            return i
    return None


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection from llama.cpp's interleaved pairs back to rotate-half, per head.

    The inverse of ember.quant.gguf.permute_rope_rows: row 2i + j of a head moves to j * D/2 + i.
    """
    out = w.shape[0]
    return w.reshape(n_heads, out // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantized(tensor, path: Path) -> np.ndarray:
    """One GGUF tensor as fp32 in PyTorch's (out, in) order."""
    gguf = gguf_module()
    kind = tensor.tensor_type.name
    if kind not in TENSOR_TYPES:
        raise GGUFError(f"{path.name}: tensor {tensor.name} has type {kind}, which ember does not read "
                        f"(supported: {', '.join(TENSOR_TYPES)})")
    try:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except Exception as e:  # noqa: BLE001  a short memmap (truncated file) fails here
        raise GGUFError(f"{path.name}: cannot read tensor {tensor.name} (truncated or corrupt file?): {e}") from None
    # GGUF lists dimensions fastest-first; reversed, they are PyTorch's shape.
    # A copy: F32 data is a read-only view of the memory-mapped file.
    return np.array(data, dtype=np.float32).reshape(tuple(int(d) for d in reversed(tensor.shape)))


# Block formats the native quantized kernels read as stored (ember/quant/gguf_linear.py); with
# keep_quantized, other quantized types are requantized to the nearest of them at load.
KEPT_TYPES = ("Q8_0", "Q4_0", "Q4_1")
REQUANTIZED_TO = "Q8_0"  # for Q5_x and the K-quants: 8 bits keeps their 2-6-bit values within ~0.4 %


def load_gguf_model(path: Path, dtype: torch.dtype = torch.float32, keep_quantized: bool = False) -> Transformer:
    """Build the Transformer a GGUF file describes and fill it with its weights.

    keep_quantized=False dequantizes every tensor to `dtype` (what transformers does).
    keep_quantized=True keeps Q8_0 / Q4_0 / Q4_1 weights as their blocks (GGUFLinear for the
    projections and an untied head, GGUFEmbedding for token_embd, a tied head on the embedding's
    own blocks), as llama.cpp runs them; other quantized types are requantized to Q8_0, and dense
    (F32/F16/BF16) weights stay dense in `dtype`. The load is summarised in one log line.
    """
    gguf = gguf_module()
    reader = open_gguf(path)
    cfg = config_from_gguf(reader, path)
    arch = architecture(reader, path)
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, _NAME_MAPS[arch]), cfg.num_layers)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = dict(model.state_dict())
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
    by_gguf: dict[str, list[str]] = {}  # several keys: Falcon's attn_qkv, rows of q, k, v in order
    for key in expected:
        hf_name = falcon_name(key, cfg) if arch == "falcon" else key
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:  # a gap in gguf's name map, not the user's file
            raise GGUFError(f"gguf's tensor name map has no name for {key!r}")
        by_gguf.setdefault(gguf_name, []).append(key)
    state: dict[str, torch.Tensor] = {}
    blocks: dict[str, tuple[torch.Tensor, str]] = {}  # module name -> (uint8 blocks, type)
    counts: dict[str, int] = {}
    for tensor in reader.tensors:
        keys = by_gguf.get(tensor.name)
        if keys is None:
            raise GGUFError(f"{path.name} holds tensor {tensor.name}, which a {arch} model "
                            "of this config does not have")
        shape = tuple(int(d) for d in reversed(tensor.shape))
        rows = [expected[k].shape[0] for k in keys]
        want = (sum(rows), *expected[keys[0]].shape[1:])
        if shape != want:
            raise GGUFError(f"{path.name}: tensor {tensor.name} has shape {shape} but the metadata "
                            f"implies {want}")
        kind = tensor.tensor_type.name
        keep = keep_quantized and len(shape) == 2 and kind not in ("F32", "F16", "BF16") and shape[1] % 32 == 0
        if keep:
            w = _blocks(tensor, path) if kind in KEPT_TYPES else _requantized(tensor, path)
            kind_kept = kind if kind in KEPT_TYPES else REQUANTIZED_TO
            label = f"{kind} kept" if kind in KEPT_TYPES else f"{kind} requantized to {REQUANTIZED_TO}"
        else:
            w = torch.from_numpy(dequantized(tensor, path))
            label = kind
        counts[label] = counts.get(label, 0) + 1
        if arch == "gemma3" and tensor.name.endswith("norm.weight"):
            w = w - 1  # llama.cpp's converter stored Gemma's (1 + weight) norm weights as 1 + weight
        # Row splits and permutations act on whole rows, so they apply to block rows as to dense ones.
        for key, part in zip(keys, w.split(rows)):
            if cfg.hf_model_type == "llama" and key.endswith("q_proj.weight"):
                part = unpermute_rope_rows(part, cfg.num_heads)
            elif cfg.hf_model_type == "llama" and key.endswith("k_proj.weight"):
                part = unpermute_rope_rows(part, cfg.n_kv_heads)
            if keep:
                blocks[key.removesuffix(".weight")] = (part.contiguous(), kind_kept)
            else:
                state[key] = part.to(dtype).contiguous()
    missing = sorted(name for name, keys in by_gguf.items()
                     if any(k not in state and k.removesuffix(".weight") not in blocks for k in keys))
    if missing:
        raise GGUFError(f"{path.name} lacks {len(missing)} tensor(s), e.g. {missing[0]}")
    _install_blocks(model, blocks, state, dtype)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    how = "quantized blocks kept" if keep_quantized else f"dequantized to {str(dtype).removeprefix('torch.')}"
    log.info("loaded %s, %s: %s tensors", path.name, how, ", ".join(f"{n} {k}" for k, n in counts.items()))
    return model.eval()


def _blocks(tensor, path: Path) -> torch.Tensor:
    """A Q8_0/Q4_0/Q4_1 tensor's raw blocks, uint8 (out, row bytes), copied out of the mapped file."""
    try:
        data = np.array(tensor.data, dtype=np.uint8)
    except Exception as e:  # noqa: BLE001  a short memmap (truncated file) fails here
        raise GGUFError(f"{path.name}: cannot read tensor {tensor.name} (truncated or corrupt file?): {e}") from None
    return torch.from_numpy(data.reshape(int(tensor.shape[-1]), -1))


def _requantized(tensor, path: Path) -> torch.Tensor:
    """A tensor of another quantized type as Q8_0 blocks (dequantized, then quantized by gguf)."""
    gguf = gguf_module()
    dense = dequantized(tensor, path)
    return torch.from_numpy(gguf.quants.quantize(dense, gguf.GGMLQuantizationType[REQUANTIZED_TO]))


def _install_blocks(model: Transformer, blocks: dict[str, tuple[torch.Tensor, str]],
                    state: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Swap the modules whose weights were kept as blocks for GGUFLinear / GGUFEmbedding (their
    biases, if any, move out of `state` into them)."""
    from ember.quant.gguf_embedding import GGUFEmbedding
    from ember.quant.gguf_linear import GGUFLinear

    for name, (data, kind) in blocks.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, attr)
        if isinstance(old, nn.Embedding):
            new: nn.Module = GGUFEmbedding(data, kind, tuple(old.weight.shape), dtype)
        else:
            bias = state.pop(f"{name}.bias", None)
            new = GGUFLinear(data, kind, (old.out_features, old.in_features), bias)
        setattr(parent, attr, new)
    embed = model.model.embed_tokens
    if model.config.tie_word_embeddings and isinstance(embed, GGUFEmbedding):
        model.lm_head = embed.tied_head()
