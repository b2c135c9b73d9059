"""Falcon checkpoints <-> ember: config.json fields, tensor names and the fused q|k|v.

Falcon (`model_type` falcon) is ember's one Transformer by configuration (LayerNorm with bias,
ungated GELU MLP, the parallel block, MQA/GQA, RoPE or ALiBi; ember/config.py). Only its names
differ, and its attention keeps q, k and v in one `query_key_value` weight whose rows are grouped
by KV head: for each KV head g, that group's query heads, then key g, then value g. That one
layout covers all three of Falcon's spellings (multi-query: one group; classic multi-head: one
query head per group, q/k/v interleaved per head; the new decoder architecture: GQA groups), so
one row permutation splits it into ember's q_proj/k_proj/v_proj on load and joins it on save.

    ember name                                Falcon name
    model.embed_tokens                        transformer.word_embeddings
    model.layers.N.input_layernorm            transformer.h.N.input_layernorm | ln_attn
    model.layers.N.post_attention_layernorm   transformer.h.N.post_attention_layernorm | ln_mlp
    model.layers.N.self_attn.{q,k,v}_proj     transformer.h.N.self_attention.query_key_value
    model.layers.N.self_attn.o_proj           transformer.h.N.self_attention.dense
    model.layers.N.mlp.up_proj / down_proj    transformer.h.N.mlp.dense_h_to_4h / dense_4h_to_h
    model.norm                                transformer.ln_f

PEFT adapters use the Falcon names too (ember/checkpoint/peft.py calls `adapter_from_falcon` /
`adapter_to_falcon`): a LoRA on query_key_value becomes LoRAs on q/k/v sharing its A, each with
its rows of B; LoRAs on q/k/v are joined back exactly (one shared A if they share it, otherwise
A stacked and B block-diagonal, rank summed).
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from ember.config import ConfigError, ModelConfig

_QKV = ("q_proj", "k_proj", "v_proj")
# (ember pattern, Falcon replacement); applied to the text after model./transformer.
_TO_FALCON = [
    (r"^model\.embed_tokens\.", "transformer.word_embeddings."),
    (r"^model\.norm\.", "transformer.ln_f."),
    (r"^model\.layers\.(\d+)\.self_attn\.o_proj\b", r"transformer.h.\1.self_attention.dense"),
    (r"^model\.layers\.(\d+)\.mlp\.up_proj\b", r"transformer.h.\1.mlp.dense_h_to_4h"),
    (r"^model\.layers\.(\d+)\.mlp\.down_proj\b", r"transformer.h.\1.mlp.dense_4h_to_h"),
    (r"^model\.layers\.(\d+)\.", r"transformer.h.\1."),
]
_FROM_FALCON = [
    (r"^transformer\.word_embeddings\.", "model.embed_tokens."),
    (r"^transformer\.ln_f\.", "model.norm."),
    (r"^transformer\.h\.(\d+)\.self_attention\.dense\b", r"model.layers.\1.self_attn.o_proj"),
    (r"^transformer\.h\.(\d+)\.mlp\.dense_h_to_4h\b", r"model.layers.\1.mlp.up_proj"),
    (r"^transformer\.h\.(\d+)\.mlp\.dense_4h_to_h\b", r"model.layers.\1.mlp.down_proj"),
    (r"^transformer\.h\.(\d+)\.ln_attn\.", r"model.layers.\1.input_layernorm."),
    (r"^transformer\.h\.(\d+)\.ln_mlp\.", r"model.layers.\1.post_attention_layernorm."),
    (r"^transformer\.h\.(\d+)\.", r"model.layers.\1."),
]
_FUSED = re.compile(r"^transformer\.h\.(\d+)\.self_attention\.query_key_value$")


def is_falcon(cfg: ModelConfig) -> bool:
    return cfg.hf_model_type == "falcon"


# ---- config.json ---------------------------------------------------------------------------
def config_from_falcon(hf: dict[str, Any], rope: tuple[float, Any]) -> dict[str, Any]:
    """ModelConfig keyword arguments for a Falcon config.json (rope: hf_config's (theta, scaling))."""
    hidden, heads = int(hf["hidden_size"]), int(hf.get("num_attention_heads", hf.get("n_head", 0)))
    if not heads:
        raise ConfigError("config.json is missing the field 'num_attention_heads'")
    new_arch = bool(hf.get("new_decoder_architecture", False))
    parallel = bool(hf.get("parallel_attn", True))
    if new_arch:
        kv = int(hf.get("num_kv_heads") or heads)
        two_norms = (hf.get("num_ln_in_parallel_attn") or 2) == 2
        if not parallel:
            raise ConfigError("config.json asks for Falcon's new decoder architecture without parallel_attn, "
                              "which transformers does not run either")
    else:
        kv = 1 if hf.get("multi_query", True) else heads
        two_norms = False
    act = hf.get("activation", "gelu")
    if act != "gelu":
        raise ConfigError(f"unsupported Falcon activation {act!r} in config.json (ember's Falcon MLP is GELU)")
    alibi = bool(hf.get("alibi", False))
    theta, scaling = rope
    bias = bool(hf.get("bias", False))
    return dict(
        vocab_size=int(hf["vocab_size"]), hidden_size=hidden,
        intermediate_size=int(hf.get("ffn_hidden_size") or 4 * hidden),
        num_layers=int(hf.get("num_hidden_layers", hf.get("n_layer", 0))), num_heads=heads, num_kv_heads=kv,
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        rms_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        position="alibi" if alibi else "rope", rope_theta=theta, rope_scaling=scaling,
        alibi_slope_scale=1.0 / math.sqrt(hidden // heads) if alibi else 1.0,
        attention_bias=bias, linear_bias=bias, norm="layernorm", gated_mlp=False, mlp_act="gelu",
        parallel_attn=parallel or new_arch, parallel_mlp_norm=two_norms,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )


def config_to_falcon(cfg: ModelConfig) -> dict[str, Any]:
    """The Falcon-specific config.json fields for cfg (hf_config adds the common ones)."""
    H, Hkv = cfg.num_heads, cfg.n_kv_heads
    if cfg.d_head * H != cfg.hidden_size or cfg.is_moe or cfg.gated_mlp or cfg.norm != "layernorm" \
            or cfg.attention_bias != cfg.linear_bias or cfg.sliding_window is not None:
        raise ConfigError("this model cannot be written as a Falcon config.json (it is not a Falcon block)")
    # The fused layout is grouped by KV head in every spelling; pick the one transformers reads.
    new_arch = cfg.parallel_mlp_norm or Hkv not in (1, H)
    out: dict[str, Any] = {
        "architectures": ["FalconForCausalLM"], "model_type": "falcon",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "ffn_hidden_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": H, "num_kv_heads": Hkv,
        "new_decoder_architecture": new_arch, "multi_query": Hkv == 1,
        "num_ln_in_parallel_attn": (2 if cfg.parallel_mlp_norm else 1) if new_arch else None,
        "parallel_attn": cfg.parallel_attn, "bias": cfg.linear_bias, "activation": "gelu",
        "alibi": cfg.position == "alibi", "layer_norm_epsilon": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
    }
    if new_arch and not cfg.parallel_attn:
        raise ConfigError("a sequential Falcon block with grouped KV heads has no Falcon config.json spelling")
    return out


# ---- the fused q|k|v -----------------------------------------------------------------------
def qkv_order(cfg: ModelConfig) -> torch.Tensor:
    """Row indices into cat(q, k, v) giving Falcon's fused rows: fused = cat(q, k, v)[order]."""
    H, Hkv, hd = cfg.num_heads, cfg.n_kv_heads, cfg.d_head
    rep = H // Hkv
    heads: list[int] = []
    for g in range(Hkv):  # each KV group: its query heads, then its key, then its value
        heads += list(range(g * rep, (g + 1) * rep)) + [H + g, H + Hkv + g]
    return (torch.tensor(heads).unsqueeze(1) * hd + torch.arange(hd)).reshape(-1)


def split_qkv(fused: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    """Falcon's fused rows (weight, bias or LoRA B) -> [q, k, v] rows."""
    order = qkv_order(cfg)
    if fused.shape[0] != order.numel():
        raise ConfigError(f"query_key_value has {fused.shape[0]} rows but the config expects {order.numel()}")
    flat = torch.empty_like(fused)
    flat[order] = fused
    q = cfg.num_heads * cfg.d_head
    kv = cfg.n_kv_heads * cfg.d_head
    return list(flat.split([q, kv, kv]))


def join_qkv(parts: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    return torch.cat(parts)[qkv_order(cfg)]


# ---- state dicts ---------------------------------------------------------------------------
def _rename(key: str, rules: list[tuple[str, str]]) -> str:
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


def state_from_falcon(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Falcon tensor names -> ember's, query_key_value split into q/k/v."""
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        module, _, param = key.rpartition(".")
        m = _FUSED.match(module)
        if m:
            for name, part in zip(_QKV, split_qkv(t, cfg)):
                out[f"model.layers.{m[1]}.self_attn.{name}.{param}"] = part.contiguous()
        else:
            out[_rename(key, _FROM_FALCON)] = t
    return out


def falcon_name(key: str, cfg: ModelConfig) -> str:
    """The Falcon name of one ember tensor (q/k/v: their layer's query_key_value)."""
    m = re.match(r"^model\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)$", key)
    if m:
        return f"transformer.h.{m[1]}.self_attention.query_key_value.{m[3]}"
    name = _rename(key, _TO_FALCON)
    if cfg.parallel_mlp_norm:  # the new decoder architecture's names for its two norms
        name = re.sub(r"\.input_layernorm\.", ".ln_attn.", name)
        name = re.sub(r"\.post_attention_layernorm\.", ".ln_mlp.", name)
    return name


def state_to_falcon(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """ember tensor names -> Falcon's, q/k/v joined into query_key_value."""
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        m = re.match(r"^model\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)$", key)
        if m:
            if m[2] == "q":
                parts = [state[f"model.layers.{m[1]}.self_attn.{n}.{m[3]}"] for n in _QKV]
                out[falcon_name(key, cfg)] = join_qkv(parts, cfg)
            continue
        out[falcon_name(key, cfg)] = t
    return out


# ---- PEFT adapters ({module: {"A": (r, in), "B": (out, r)}}, with rank and alpha) ------------
_TARGETS = {"query_key_value": ("q_proj", "k_proj", "v_proj"), "dense": ("o_proj",),
            "dense_h_to_4h": ("up_proj",), "dense_4h_to_h": ("down_proj",)}


def falcon_targets(targets: tuple[str, ...]) -> tuple[str, ...]:
    """LoRA target names as Falcon spells them -> ember's (query_key_value -> q_proj, k_proj, v_proj)."""
    return tuple(n for t in targets for n in _TARGETS.get(t, (t,)))


def adapter_from_falcon(weights: dict[str, dict[str, torch.Tensor]],
                        cfg: ModelConfig) -> dict[str, dict[str, torch.Tensor]]:
    """A Falcon-named adapter's A/B per module -> ember modules (query_key_value: A shared, B split)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for module, ab in weights.items():
        m = _FUSED.match(module)
        if m:
            for name, b in zip(_QKV, split_qkv(ab["B"], cfg)):
                out[f"model.layers.{m[1]}.self_attn.{name}"] = {"A": ab["A"], "B": b.contiguous()}
        else:
            out[_rename(module + ".", _FROM_FALCON)[:-1]] = ab
    return out


def falcon_module(name: str) -> str:
    """The Falcon name of an ember module (q/k/v: their query_key_value)."""
    m = re.match(r"^model\.layers\.(\d+)\.self_attn\.(q|k|v)_proj$", name)
    if m:
        return f"transformer.h.{m[1]}.self_attention.query_key_value"
    return _rename(name + ".", _TO_FALCON)[:-1]


def adapter_to_falcon(layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]],
                      cfg: ModelConfig) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """ember LoRAs {module: (A, B, scaling)} -> Falcon's {module: (A, B, scaling)}, exactly.

    q/k/v LoRAs of one layer become one query_key_value LoRA: with one A shared by all three and
    one scaling, A as it is and B's rows joined; otherwise A stacked, B block-diagonal (zero rows
    for a projection without a LoRA) and each B pre-multiplied by its scaling (scaling 1).
    """
    out: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    layers_qkv: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, float]]] = {}
    for name, abs_ in layers.items():
        m = re.match(r"^(model\.layers\.\d+\.self_attn)\.(q_proj|k_proj|v_proj)$", name)
        if m:
            layers_qkv.setdefault(m[1], {})[m[2]] = abs_
        else:
            out[falcon_module(name)] = abs_
    q_rows, kv_rows = cfg.num_heads * cfg.d_head, cfg.n_kv_heads * cfg.d_head
    for prefix, parts in layers_qkv.items():
        fused = falcon_module(prefix + ".q_proj")
        first = next(iter(parts.values()))
        if len(parts) == 3 and all(p[0] is first[0] or torch.equal(p[0], first[0]) for p in parts.values()) \
                and len({p[2] for p in parts.values()}) == 1:
            out[fused] = (first[0], join_qkv([parts[n][1] for n in _QKV], cfg), first[2])
            continue
        A = torch.cat([parts[n][0] for n in _QKV if n in parts])
        blocks, col = [], 0
        for n, rows in zip(_QKV, (q_rows, kv_rows, kv_rows)):
            b = torch.zeros(rows, A.shape[0], dtype=A.dtype)
            if n in parts:
                a, b_n, s = parts[n]
                b[:, col:col + a.shape[0]] = b_n.to(A.dtype) * s
                col += a.shape[0]
            blocks.append(b)
        out[fused] = (A, join_qkv(blocks, cfg), 1.0)
    return out
