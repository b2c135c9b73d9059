"""Gemma 3 text (`model_type` gemma3_text) config.json <-> ModelConfig.

Gemma 3 is ember's one Transformer by configuration (ember/config.py): (1 + weight) RMSNorm,
q/k norms, sandwich norms, GeGLU, embeddings scaled by sqrt(hidden), interleaved sliding and
full layers (`layer_types`, or every `sliding_window_pattern`-th layer full) whose RoPE bases
differ (`rope_local_base_freq` for the sliding ones), attention scaled by
query_pre_attn_scalar ** -0.5 and optional final-logit soft-capping. Its tensor names are
Hugging Face's Gemma names, which ember's modules share, so no renaming is needed.
Attention-logit soft-capping (Gemma 2) is refused: ember's attention backends do not apply it.
"""

from __future__ import annotations

from typing import Any

from ember.config import ConfigError, ModelConfig, RopeScaling

GEMMA3 = "gemma3_text"


def _layer_types(hf: dict[str, Any], layers: int) -> tuple[str, ...]:
    types = hf.get("layer_types")
    if types:
        return tuple(types)
    pattern = int(hf.get("sliding_window_pattern", 6))
    return tuple("sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers))


def _ropes(hf: dict[str, Any], rope_from: Any) -> tuple[float, RopeScaling, float]:
    """(global theta, global scaling, local theta) from either RoPE spelling."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:  # transformers v5: one entry per layer type
        theta, scaling = rope_from({"rope_parameters": params["full_attention"]})
        local = float((params.get("sliding_attention") or {}).get("rope_theta", 10000.0))
        return theta, scaling, local
    theta, scaling = rope_from({**hf, "rope_theta": hf.get("rope_theta", 1_000_000.0)})
    return theta, scaling, float(hf.get("rope_local_base_freq", 10000.0))


def config_from_gemma3(hf: dict[str, Any], rope_from: Any) -> dict[str, Any]:
    """ModelConfig keyword arguments for a gemma3_text config.json (rope_from: hf_config's reader)."""
    if hf.get("attn_logit_softcapping"):
        raise ConfigError("config.json asks for attention-logit soft-capping, which ember does not support")
    if hf.get("use_bidirectional_attention"):
        raise ConfigError("config.json asks for bidirectional attention (an embedding model), which ember "
                          "does not support")
    act = hf.get("hidden_activation", hf.get("hidden_act", "gelu_pytorch_tanh"))
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ConfigError(f"unsupported hidden_activation {act!r} in config.json (Gemma's MLP is tanh-GELU)")
    layers = int(hf["num_hidden_layers"])
    theta, scaling, local = _ropes(hf, rope_from)
    cap = hf.get("final_logit_softcapping")
    return dict(
        vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]), num_layers=layers,
        num_heads=int(hf["num_attention_heads"]), num_kv_heads=int(hf.get("num_key_value_heads") or 1),
        head_dim=int(hf.get("head_dim", 256)), max_position_embeddings=int(hf.get("max_position_embeddings", 131072)),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
        attention_bias=bool(hf.get("attention_bias", False)), sliding_window=hf.get("sliding_window"),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        norm="rms_offset", mlp_act="gelu_tanh", qk_norm=True, sandwich_norm=True, embed_scale=True,
        attn_scale=float(hf.get("query_pre_attn_scalar", 256)) ** -0.5, layer_types=_layer_types(hf, layers),
        local_rope_theta=local, final_logit_softcapping=None if cap is None else float(cap),
    )


def config_to_gemma3(cfg: ModelConfig) -> dict[str, Any]:
    """The Gemma-specific config.json fields for cfg (hf_config adds the common ones)."""
    if not (cfg.norm == "rms_offset" and cfg.qk_norm and cfg.sandwich_norm and cfg.embed_scale
            and cfg.mlp_act == "gelu_tanh" and cfg.gated_mlp and not cfg.is_moe and cfg.attn_scale):
        raise ConfigError("this model cannot be written as a gemma3_text config.json (it is not a Gemma 3 block)")
    local = {"rope_type": "default", "rope_theta": cfg.local_rope_theta or cfg.rope_theta}
    scalar = round(cfg.attn_scale ** -2, 6)  # transformers' config wants an int where it is one
    return {
        "architectures": ["Gemma3ForCausalLM"], "model_type": GEMMA3,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.d_head, "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
        "attention_bias": cfg.attention_bias, "sliding_window": cfg.sliding_window,
        "layer_types": list(cfg.layer_types) or ["full_attention"] * cfg.num_layers,
        "query_pre_attn_scalar": int(scalar) if scalar == int(scalar) else scalar, "rope_local_base_freq": local["rope_theta"],
        "final_logit_softcapping": cfg.final_logit_softcapping, "attn_logit_softcapping": None,
    }


def rope_parameters(cfg: ModelConfig, global_rope: dict[str, Any]) -> dict[str, Any]:
    """transformers v5's per-layer-type rope_parameters."""
    return {"full_attention": global_rope,
            "sliding_attention": {"rope_type": "default", "rope_theta": cfg.local_rope_theta or cfg.rope_theta}}
