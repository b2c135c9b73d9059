"""ModelConfig: the architecture of ember's one Transformer, plus named presets.

A frozen dataclass holding architecture only (shapes, position scheme, attention variant,
experts); training, serving and quantization settings live in their own configs. The same
fields describe every supported Hugging Face family (Llama, Mistral, Qwen2, Mixtral) and
ember's own models; `ember/checkpoint/hf.py` maps them to and from `config.json`.

    from ember.config import ModelConfig, preset
    cfg = preset("quickstart-10m")
    cfg.num_params(), cfg.flops_per_token(seq_len=512)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from ember.errors import EmberError

RopeType = Literal["default", "linear", "dynamic", "llama3"]
NormType = Literal["rms", "layernorm", "rms_offset"]
MlpAct = Literal["silu", "gelu", "gelu_tanh"]
LayerType = Literal["sliding_attention", "full_attention"]


class ConfigError(EmberError):
    """A model configuration that cannot describe a valid model."""


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (Hugging Face `rope_parameters` / `rope_scaling`)."""

    rope_type: RopeType = "default"
    factor: float = 1.0
    # llama3 only: the context the base model was trained on and the wavelength band limits.
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer (pre-norm, RMSNorm, SwiGLU or sparse MoE)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int | None = None  # None: multi-head (= num_heads); 1: multi-query
    head_dim: int | None = None  # None: hidden_size // num_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    position: Literal["rope", "alibi"] = "rope"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2)
    sliding_window: int | None = None  # attend to at most this many most recent tokens (Mistral)
    # Layers at index >= this use the sliding window (Qwen2's max_window_layers); 0 = all layers.
    sliding_window_start_layer: int = 0
    num_experts: int = 0  # 0: dense SwiGLU MLP; >0: sparse MoE block (Mixtral)
    num_experts_per_tok: int = 2
    router_aux_loss_coef: float = 0.02
    tie_word_embeddings: bool = False
    # Token ids the model was trained with: saved to config.json so HF generate stops correctly.
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    # Which Hugging Face family this config came from or should be saved as (None: choose).
    hf_model_type: str | None = None
    # ---- block variants (Falcon); the defaults are the Llama block ---------------------------
    # "layernorm": LayerNorm with bias, eps = rms_norm_eps (Falcon); "rms_offset": RMSNorm scaling
    # by (1 + weight) in fp32 (Gemma)
    norm: NormType = "rms"
    gated_mlp: bool = True  # False: down(act(up(x))), no gate_proj (Falcon)
    # silu: SwiGLU; gelu: exact (erf) GELU, as Falcon's nn.GELU; gelu_tanh gated: GeGLU (Gemma)
    mlp_act: MlpAct = "silu"
    linear_bias: bool = False  # bias on o_proj and the MLP projections (Falcon's `bias`)
    # Attention and MLP both read the block's input and add to one residual (GPT-J, Falcon);
    # with parallel_mlp_norm the MLP has its own norm (Falcon's "new decoder architecture").
    parallel_attn: bool = False
    parallel_mlp_norm: bool = False
    # ALiBi slopes are multiplied by this: Falcon adds its ALiBi before the 1/sqrt(head_dim) scale.
    alibi_slope_scale: float = 1.0
    # ---- Gemma 3 ---------------------------------------------------------------------------
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE
    sandwich_norm: bool = False  # norms after attention and after the MLP too (+ a pre-MLP norm)
    embed_scale: bool = False  # embeddings multiplied by sqrt(hidden_size), in the model's dtype
    attn_scale: float | None = None  # attention scale; None: 1/sqrt(head_dim)
    # Per layer: "sliding_attention" (uses sliding_window) or "full_attention"; () = by the fields above.
    layer_types: tuple[LayerType, ...] = ()
    local_rope_theta: float | None = None  # RoPE base of the sliding layers (no scaling); None: rope_theta
    final_logit_softcapping: float | None = None  # logits = cap * tanh(logits / cap)

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        if isinstance(self.eos_token_id, int):
            object.__setattr__(self, "eos_token_id", (self.eos_token_id,))
        elif isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if isinstance(self.layer_types, list):
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        self.validate()

    # ---- derived shapes -------------------------------------------------------------------
    @property
    def n_kv_heads(self) -> int:
        return self.num_kv_heads if self.num_kv_heads is not None else self.num_heads

    @property
    def d_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def llama_block(self) -> bool:
        """Whether every block is the plain Llama block (RMSNorm, SwiGLU, sequential, RoPE): the one
        the engine's native decode layer computes."""
        return (self.norm == "rms" and self.gated_mlp and self.mlp_act == "silu" and not self.linear_bias
                and not self.parallel_attn and self.position == "rope" and not self.qk_norm
                and not self.sandwich_norm and not self.embed_scale and self.attn_scale is None
                and self.local_rope_theta is None and self.final_logit_softcapping is None)

    def layer_window(self, layer_idx: int) -> int | None:
        """The sliding window of one layer, or None for full causal attention."""
        if self.layer_types:
            return self.sliding_window if self.layer_types[layer_idx] == "sliding_attention" else None
        if self.sliding_window is None or layer_idx < self.sliding_window_start_layer:
            return None
        return self.sliding_window

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(f"invalid model config: {msg}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads"):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        need(self.n_kv_heads > 0 and self.num_heads % self.n_kv_heads == 0,
             f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.n_kv_heads})")
        need(self.head_dim is not None or self.hidden_size % self.num_heads == 0,
             f"hidden_size ({self.hidden_size}) must divide by num_heads ({self.num_heads}) or set head_dim")
        need(self.position in ("rope", "alibi"), f"position must be 'rope' or 'alibi', got {self.position!r}")
        need(self.position != "rope" or self.d_head % 2 == 0, f"RoPE needs an even head_dim, got {self.d_head}")
        need(self.rope_scaling.rope_type in ("default", "linear", "dynamic", "llama3"),
             f"unsupported rope scaling type {self.rope_scaling.rope_type!r} "
             "(supported: default, linear, dynamic, llama3)")
        need(self.rope_scaling.factor > 0, "rope scaling factor must be positive")
        need(self.sliding_window is None or self.sliding_window > 0, "sliding_window must be positive")
        need(self.norm in ("rms", "layernorm", "rms_offset"),
             f"norm must be 'rms', 'layernorm' or 'rms_offset', got {self.norm!r}")
        need(self.mlp_act in ("silu", "gelu", "gelu_tanh"),
             f"mlp_act must be 'silu', 'gelu' or 'gelu_tanh', got {self.mlp_act!r}")
        need(not self.layer_types or len(self.layer_types) == self.num_layers,
             f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        need(all(t in ("sliding_attention", "full_attention") for t in self.layer_types),
             "layer_types entries must be 'sliding_attention' or 'full_attention'")
        need("sliding_attention" not in self.layer_types or self.sliding_window is not None,
             "sliding_attention layers need sliding_window")
        need(not self.gated_mlp or self.mlp_act != "gelu",
             "a gated MLP is SwiGLU (mlp_act 'silu') or GeGLU (mlp_act 'gelu_tanh'), not exact-GELU gated")
        need(self.parallel_attn or not self.parallel_mlp_norm, "parallel_mlp_norm needs parallel_attn")
        need(not (self.is_moe and (self.parallel_attn or not self.gated_mlp)),
             "a mixture of experts needs the sequential block with the gated MLP")
        need(self.num_experts == 0 or 0 < self.num_experts_per_tok <= self.num_experts,
             f"num_experts_per_tok ({self.num_experts_per_tok}) must be in 1..num_experts ({self.num_experts})")

    # ---- accounting -------------------------------------------------------------------------
    def num_params(self, *, non_embedding: bool = False, active: bool = False) -> int:
        """Parameter count. `active`: count only the top-k experts a token uses (MoE)."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.d_head
        q_out, kv_out = self.num_heads * hd, self.n_kv_heads * hd
        attn = d * q_out + 2 * d * kv_out + q_out * d
        if self.attention_bias:
            attn += q_out + 2 * kv_out
        mlp = (3 if self.gated_mlp else 2) * d * f
        if self.linear_bias:
            attn += d
            mlp += f * (2 if self.gated_mlp else 1) + d
        if self.is_moe:
            experts = self.num_experts_per_tok if active else self.num_experts
            mlp = experts * mlp + d * self.num_experts  # experts + router
        norm = d * (2 if self.norm == "layernorm" else 1)  # weight (+ bias)
        norms = 1 if self.parallel_attn and not self.parallel_mlp_norm else 2
        if self.sandwich_norm:
            norms += 2
        if self.qk_norm:
            attn += 2 * hd
        per_layer = attn + mlp + norms * norm
        body = self.num_layers * per_layer + norm  # final norm
        if non_embedding:
            return body
        embed = self.vocab_size * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return body + embed + head

    def flops_per_token(self, seq_len: int, *, training: bool = True) -> float:
        """Model FLOPs per token: 2 per active matmul weight (6 with backward) plus attention.

        The attention term counts QK^T and AV over a causal context of average length
        seq_len / 2 (PaLM appendix B style, halved for causality).
        """
        d, hd = self.hidden_size, self.d_head
        norm = d * (2 if self.norm == "layernorm" else 1)
        norms = (1 if self.parallel_attn and not self.parallel_mlp_norm else 2) + (2 if self.sandwich_norm else 0)
        matmul_params = self.num_params(non_embedding=True, active=True) - (self.num_layers * norms + 1) * norm
        matmul_params += self.vocab_size * d  # the LM head is a matmul even when tied
        # each layer's own window (Qwen2's upper layers, Gemma 3's local ones)
        windows = [self.layer_window(i) for i in range(self.num_layers)]
        ctx = sum(seq_len / 2 if w is None else min(seq_len / 2, w) for w in windows)
        attn = 2 * 2 * self.num_heads * hd * ctx
        fwd = 2 * matmul_params + attn
        return 3 * fwd if training else fwd

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """Bytes of K and V cache one token occupies across all layers."""
        return 2 * self.num_layers * self.n_kv_heads * self.d_head * dtype_bytes

    # ---- (de)serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["eos_token_id"] = list(self.eos_token_id)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"invalid model config: unknown field(s) {', '.join(unknown)}")
        return cls(**data)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


# ---- presets -------------------------------------------------------------------------------
# Shapes only; the vocab of the tiny/quickstart/bench presets matches ember's own tokenizers.
PRESETS: dict[str, ModelConfig] = {
    # For tests: a few hundred thousand parameters, every code path (GQA) exercised.
    "tiny": ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=176, num_layers=2,
                        num_heads=4, num_kv_heads=2, max_position_embeddings=512,
                        tie_word_embeddings=True),
    "tiny-moe": ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                            num_heads=4, num_kv_heads=2, max_position_embeddings=512,
                            num_experts=4, num_experts_per_tok=2),
    # ~10M parameters: pretrains on the bundled corpus in minutes on two CPU cores.
    "quickstart-10m": ModelConfig(vocab_size=8192, hidden_size=256, intermediate_size=768,
                                  num_layers=10, num_heads=8, num_kv_heads=4,
                                  max_position_embeddings=1024, tie_word_embeddings=True),
    # ~50M parameters: the benchmark model for training and serving.
    "bench-50m": ModelConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408,
                             num_layers=10, num_heads=8, num_kv_heads=8,
                             max_position_embeddings=2048, tie_word_embeddings=True),
    # Published shapes, for FLOP and memory accounting (and for loading the real checkpoints).
    "llama-3-8b": ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                              num_layers=32, num_heads=32, num_kv_heads=8,
                              max_position_embeddings=131072, rope_theta=500000.0,
                              rope_scaling=RopeScaling("llama3", 8.0, 8192, 1.0, 4.0),
                              bos_token_id=128000, eos_token_id=(128001, 128008, 128009),
                              hf_model_type="llama"),
    "mixtral-8x7b": ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                num_layers=32, num_heads=32, num_kv_heads=8,
                                max_position_embeddings=32768, rope_theta=1e6,
                                num_experts=8, num_experts_per_tok=2,
                                bos_token_id=1, eos_token_id=(2,), hf_model_type="mixtral"),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named preset, optionally with fields replaced (e.g. vocab_size of a trained tokenizer)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
