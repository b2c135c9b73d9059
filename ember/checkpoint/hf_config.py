"""Hugging Face `config.json` <-> ModelConfig: llama, mistral, qwen2, mixtral, falcon, gemma3_text.

Reads both RoPE spellings (`rope_theta` + `rope_scaling`, and the newer `rope_parameters`),
Qwen2's sliding-window layers and Mixtral's experts. Writes the family that represents the
model exactly: mixtral for MoE, qwen2 for q/k/v bias, mistral for a sliding window, llama
otherwise; a model read as Falcon is written as Falcon (ember/checkpoint/falcon.py has its
fields), one read as Gemma 3 as Gemma 3 (ember/checkpoint/gemma.py). Models HF cannot express (ALiBi outside Falcon) are written with model_type "ember".
"""

from __future__ import annotations

from typing import Any

from ember.checkpoint.falcon import config_from_falcon, config_to_falcon
from ember.checkpoint.gemma import GEMMA3, config_from_gemma3, config_to_gemma3, rope_parameters
from ember.config import ConfigError, ModelConfig, RopeScaling

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "mixtral", "falcon", GEMMA3, "ember")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "mixtral": "MixtralForCausalLM"}


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, RopeScaling]:
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        theta = float(params["rope_theta"])
        scaling = params
    else:
        theta = float(hf.get("rope_theta", 10000.0))
        scaling = hf.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    if rope_type not in ("default", "linear", "dynamic", "llama3"):
        raise ConfigError(f"unsupported RoPE scaling type {rope_type!r} in config.json "
                          "(ember supports default, linear, dynamic and llama3)")
    if rope_type == "default":
        return theta, RopeScaling()
    return theta, RopeScaling(
        rope_type=rope_type,
        factor=float(scaling.get("factor", 1.0)),
        original_max_position_embeddings=scaling.get("original_max_position_embeddings"),
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
    )


def _qwen2_window(hf: dict[str, Any]) -> tuple[int | None, int]:
    layer_types = hf.get("layer_types")
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    if layer_types:
        sliding = [i for i, t in enumerate(layer_types) if t == "sliding_attention"]
        if not sliding:
            return None, 0
        if sliding != list(range(sliding[0], len(layer_types))):
            raise ConfigError("config.json layer_types interleaves sliding and full attention, "
                              "which ember does not support")
        return hf.get("sliding_window"), sliding[0]
    if window is None:
        return None, 0
    return window, int(hf.get("max_window_layers", 0))


def _common(hf: dict[str, Any]) -> dict[str, Any]:
    eos = hf.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    return dict(bos_token_id=hf.get("bos_token_id"), eos_token_id=eos_ids, hf_model_type=hf["model_type"])


def _checked(build: Any) -> ModelConfig:
    """build(), with a missing or mistyped config.json field as one ConfigError."""
    try:
        return build()
    except KeyError as e:
        raise ConfigError(f"config.json is missing the field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"config.json has a field of the wrong type: {e}") from None


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Translate a parsed HF config.json into a ModelConfig (raises ConfigError naming the problem)."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"unsupported model_type {model_type!r} in config.json; ember loads "
                          f"{', '.join(SUPPORTED_MODEL_TYPES[:-1])}")
    if model_type == "ember":
        return ModelConfig.from_dict(hf["ember_config"])
    if model_type == "falcon":
        return _checked(lambda: ModelConfig(**config_from_falcon(hf, _rope_from_hf(hf)), **_common(hf)))
    if model_type == GEMMA3:
        return _checked(lambda: ModelConfig(**config_from_gemma3(hf, _rope_from_hf), **_common(hf)))
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"unsupported hidden_act {act!r} in config.json (ember's MLP is SwiGLU/silu)")
    if hf.get("mlp_bias") or (model_type == "llama" and hf.get("attention_bias")):
        raise ConfigError("config.json asks for biases on o_proj/MLP (attention_bias/mlp_bias), "
                          "which ember does not support")
    return _checked(lambda: ModelConfig(**_llama_family(hf, model_type)))


def _llama_family(hf: dict[str, Any], model_type: str) -> dict[str, Any]:
    """ModelConfig fields of a llama / mistral / qwen2 / mixtral config.json."""
    theta, scaling = _rope_from_hf(hf)
    window, window_start = (_qwen2_window(hf) if model_type == "qwen2"
                            else (hf.get("sliding_window") if model_type != "llama" else None, 0))
    eos = hf.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    kwargs: dict[str, Any] = dict(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=int(hf["num_attention_heads"]),
        num_kv_heads=hf.get("num_key_value_heads"),
        head_dim=hf.get("head_dim"),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        attention_bias=model_type == "qwen2",
        sliding_window=window,
        sliding_window_start_layer=window_start,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=eos_ids,
        hf_model_type=model_type,
    )
    if model_type == "mixtral":
        kwargs.update(num_experts=int(hf["num_local_experts"]),
                      num_experts_per_tok=int(hf.get("num_experts_per_tok", 2)),
                      router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)))
    return kwargs


def hf_model_type(cfg: ModelConfig) -> str:
    """The HF family that represents cfg exactly (its own family when it came from one)."""
    if cfg.hf_model_type in ("falcon", GEMMA3):
        return cfg.hf_model_type
    if not cfg.llama_block:  # ALiBi, or a Falcon-style block outside Falcon's own family
        return "ember"
    if cfg.is_moe:
        return "mixtral"
    if cfg.attention_bias or cfg.sliding_window_start_layer > 0:
        return "qwen2"
    if cfg.sliding_window is not None:
        return cfg.hf_model_type if cfg.hf_model_type in ("mistral", "qwen2") else "mistral"
    return cfg.hf_model_type if cfg.hf_model_type in ("llama", "mistral", "qwen2") else "llama"


def config_to_hf(cfg: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
    """The config.json dict for cfg; transformers' AutoConfig reads it (v4 and v5 spellings)."""
    mt = hf_model_type(cfg)
    if mt == "ember":
        return {"model_type": "ember", "ember_config": cfg.to_dict(), "torch_dtype": dtype}
    rope: dict[str, Any] = {"rope_type": cfg.rope_scaling.rope_type, "rope_theta": cfg.rope_theta}
    legacy_scaling = None
    if cfg.rope_scaling.rope_type != "default":
        sc = cfg.rope_scaling
        extra: dict[str, Any] = {"factor": sc.factor}
        if sc.rope_type == "llama3":
            extra.update(low_freq_factor=sc.low_freq_factor, high_freq_factor=sc.high_freq_factor,
                         original_max_position_embeddings=sc.original_max_position_embeddings
                         or cfg.max_position_embeddings)
        rope.update(extra)
        legacy_scaling = {"rope_type": sc.rope_type, "type": sc.rope_type, **extra}
    eos = list(cfg.eos_token_id)
    common = {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
              "tie_word_embeddings": cfg.tie_word_embeddings, "torch_dtype": dtype, "use_cache": True,
              "rope_theta": cfg.rope_theta, "rope_scaling": legacy_scaling, "rope_parameters": rope}
    if mt == "falcon":
        return {**config_to_falcon(cfg), **common}
    if mt == GEMMA3:
        return {**config_to_gemma3(cfg), **common, "rope_parameters": rope_parameters(cfg, rope)}
    out: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[mt]],
        "model_type": mt,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.d_head,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": legacy_scaling,
        "rope_parameters": rope,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "attention_dropout": 0.0,
        "torch_dtype": dtype,
        "use_cache": True,
    }
    if mt == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    elif mt == "qwen2":
        out.update(use_sliding_window=cfg.sliding_window is not None,
                   sliding_window=cfg.sliding_window, max_window_layers=cfg.sliding_window_start_layer)
    else:
        out["sliding_window"] = cfg.sliding_window
    if mt == "mixtral":
        out.update(num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
                   router_aux_loss_coef=cfg.router_aux_loss_coef, output_router_logits=False,
                   router_jitter_noise=0.0)
    return out
