"""THE model: one decoder-only Transformer for training, fine-tuning, quantization and serving.

Pre-norm blocks (RMSNorm) of attention (MHA/GQA/MQA, optional q/k/v bias, optional sliding
window, RoPE or ALiBi) and a SwiGLU MLP or a sparse mixture of experts (Mixtral: softmax router,
top-k of E experts, renormalised weights). Falcon's variants are configuration too: LayerNorm
with bias, a GELU MLP without gate (`DenseMLP`), biases on every projection, and the parallel
block (attention and MLP read one normed input, or each its own norm, and add to one residual).
So are Gemma 3's: (1 + weight) RMSNorm, q/k norms, norms after attention and MLP ("sandwich"),
GeGLU, embeddings scaled by sqrt(hidden), interleaved sliding/full layers each with its RoPE
base, and final logit soft-capping. Module names are Hugging Face's
(`model.layers.N.self_attn.q_proj`, `model.layers.N.block_sparse_moe.experts.E.w1`, `lm_head`),
so HF checkpoints and PEFT adapters map one-to-one onto `state_dict()` keys. LoRA, quantization
and other variants swap modules in this tree; there is never a second model class.

    model = Transformer(preset("tiny"))
    logits = model(input_ids)                          # (B, T) -> (B, T, vocab)
    logits, aux = model(input_ids, return_aux_loss=True)  # MoE load-balancing loss for training
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ember.config import ModelConfig, RopeScaling
from ember.model.attention import AttentionBackend, AttnSpec, causal_attention
from ember.model.fused import FusedLinears, LinearFn
from ember.model.rope import apply_rope, rope_cos_sin

CosSin = tuple[torch.Tensor, torch.Tensor]


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32 and cast back, as HF Llama does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype == torch.float32:  # one fused op, the same arithmetic
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


class OffsetRMSNorm(nn.Module):
    """Gemma's RMSNorm: x / rms(x) * (1 + weight), all in fp32, cast back (weight starts at 0)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).to(x.dtype)


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    """The block's normalisation: RMSNorm, LayerNorm with bias (Falcon) or (1 + w) RMSNorm (Gemma)."""
    dim = dim or cfg.hidden_size
    if cfg.norm == "layernorm":
        return nn.LayerNorm(dim, eps=cfg.rms_norm_eps)
    if cfg.norm == "rms_offset":
        return OffsetRMSNorm(dim, cfg.rms_norm_eps)
    return RMSNorm(dim, cfg.rms_norm_eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        hd = cfg.d_head
        self.spec = AttnSpec(layer_idx=layer_idx, num_heads=cfg.num_heads, num_kv_heads=cfg.n_kv_heads,
                             head_dim=hd, scale=cfg.attn_scale or 1.0 / math.sqrt(hd),
                             sliding_window=cfg.layer_window(layer_idx), alibi=cfg.position == "alibi",
                             alibi_scale=cfg.alibi_slope_scale)
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.n_kv_heads * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.n_kv_heads * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_heads * hd, cfg.hidden_size, bias=cfg.linear_bias)
        self.fused_qkv: FusedLinears | None = None  # set by fuse_projections (the engine does)
        if cfg.qk_norm:
            self.q_norm = make_norm(cfg, hd)
            self.k_norm = make_norm(cfg, hd)
        self.qk_norm = cfg.qk_norm
        # Gemma 3's sliding layers rotate with their own base (Transformer.hidden passes both).
        self.local_rope = cfg.local_rope_theta is not None and self.spec.sliding_window is not None

    def fuse_projections(self, linear: LinearFn = F.linear, column_major: bool = True) -> bool:
        """Store q/k/v weights in one buffer so decode runs one matmul (ember/model/fused.py)."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        if self.fused_qkv is None or not self.fused_qkv.valid(projs):
            self.fused_qkv = FusedLinears.fuse(projs, linear, column_major)
        return self.fused_qkv is not None

    def forward(self, x: torch.Tensor, cos_sin: CosSin | None,
                attn: AttentionBackend | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        s = self.spec
        projs = (self.q_proj, self.k_proj, self.v_proj)
        fused = self.fused_qkv
        q, k, v = fused(x) if fused is not None and fused.usable(projs) else (p(x) for p in projs)
        q = q.view(B, T, s.num_heads, s.head_dim)
        k = k.view(B, T, s.num_kv_heads, s.head_dim)
        v = v.view(B, T, s.num_kv_heads, s.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if cos_sin is not None:
            q, k = self.rotate(q, k, *cos_sin)
        y = causal_attention(q, k, v, s) if attn is None else attn.attend(q, k, v, s)
        return self.o_proj(y.reshape(B, T, s.num_heads * s.head_dim))

    def rotate(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE on q and k; the serving engine swaps in a native one (ember/engine/weight_layout.py)."""
        return apply_rope(q, k, cos, sin)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.fused_gate_up: FusedLinears | None = None  # set by fuse_projections (the engine does)

    def fuse_projections(self, linear: LinearFn = F.linear, column_major: bool = True) -> bool:
        """Store gate/up weights in one buffer so decode runs one matmul (ember/model/fused.py)."""
        projs = (self.gate_proj, self.up_proj)
        if self.fused_gate_up is None or not self.fused_gate_up.valid(projs):
            self.fused_gate_up = FusedLinears.fuse(projs, linear, column_major)
        return self.fused_gate_up is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projs = (self.gate_proj, self.up_proj)
        fused = self.fused_gate_up
        gate, up = fused(x) if fused is not None and fused.usable(projs) else (p(x) for p in projs)
        return self.down_proj(self.activate(gate, up))

    def activate(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up; the serving engine swaps in a native one (ember/engine/weight_layout.py)."""
        return F.silu(gate) * up


class DenseMLP(nn.Module):
    """Ungated feed-forward: down(act(up(x))) (Falcon's dense_h_to_4h / dense_4h_to_h, exact GELU)."""

    def __init__(self, dim: int, hidden: int, bias: bool, act: str) -> None:
        super().__init__()
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.act_name = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up_proj(x)
        if self.act_name == "silu":
            h = F.silu(h)
        else:
            h = F.gelu(h, approximate="tanh" if self.act_name == "gelu_tanh" else "none")
        return self.down_proj(h)


class GeGLUMLP(MLP):
    """Gated feed-forward with tanh-GELU: down(gelu_tanh(gate(x)) * up(x)) (Gemma). A class of its
    own so the engine's native SwiGLU swap (exact type MLP) never takes it."""

    def activate(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return F.gelu(gate, approximate="tanh") * up


def make_mlp(cfg: ModelConfig) -> nn.Module:
    """The dense feed-forward a config asks for (SwiGLU, Gemma's GeGLU, or Falcon's ungated GELU)."""
    if not cfg.gated_mlp:
        return DenseMLP(cfg.hidden_size, cfg.intermediate_size, cfg.linear_bias, cfg.mlp_act)
    if cfg.mlp_act == "gelu_tanh":
        return GeGLUMLP(cfg.hidden_size, cfg.intermediate_size, cfg.linear_bias)
    return MLP(cfg.hidden_size, cfg.intermediate_size, cfg.linear_bias)


class Expert(nn.Module):
    """One Mixtral expert: the same SwiGLU, under Mixtral's names (w1 gate, w3 up, w2 down)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoE(nn.Module):
    """Sparse mixture of experts: each token goes to its top-k experts, weights renormalised."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(cfg.hidden_size, cfg.intermediate_size)
                                     for _ in range(cfg.num_experts))

    def runs_expert(self, e: int) -> bool:
        """Whether this module computes expert `e` (all of them here; expert parallel holds some)."""
        return True

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, D)
        router_logits = self.gate(x)  # (N, E)
        probs = torch.softmax(router_logits.float(), dim=-1)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)  # (N, k)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        # Loop over experts that received tokens: each runs one dense matmul on its tokens.
        for e in chosen.unique().tolist():
            if not self.runs_expert(e):
                continue
            tok, slot = torch.where(chosen == e)
            y = self.experts[e](x[tok]) * weights[tok, slot, None]
            out.index_add_(0, tok, y)
        return out.reshape(shape), router_logits


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.parallel = cfg.parallel_attn
        self.llama_block = cfg.llama_block  # the only block the engine's native decode layer computes
        self.input_layernorm = make_norm(cfg)
        self.self_attn = Attention(cfg, layer_idx)
        # A parallel block with one norm (Falcon-7B) has no second norm: its MLP reads the first's output.
        if not cfg.parallel_attn or cfg.parallel_mlp_norm:
            self.post_attention_layernorm = make_norm(cfg)
        if cfg.is_moe:
            self.block_sparse_moe = MoE(cfg)
        else:
            self.mlp = make_mlp(cfg)
        self.sandwich = cfg.sandwich_norm
        if cfg.sandwich_norm:  # Gemma: post_attention_layernorm normalises the attention's output
            self.pre_feedforward_layernorm = make_norm(cfg)
            self.post_feedforward_layernorm = make_norm(cfg)

    def forward(self, x: torch.Tensor, cos_sin: CosSin | None,
                attn: AttentionBackend | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.parallel:  # x + attn(n1(x)) + mlp(n2(x) or n1(x)), Falcon's order of additions
            h = self.input_layernorm(x)
            n2 = self._modules.get("post_attention_layernorm")
            a = self.self_attn(h, cos_sin, attn)
            return (self.mlp(h if n2 is None else n2(x)) + a) + x, None
        if self.sandwich:
            x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos_sin, attn))
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x))), None
        x = x + self.self_attn(self.input_layernorm(x), cos_sin, attn)
        h = self.post_attention_layernorm(x)
        moe = self._modules.get("block_sparse_moe")  # not hasattr: a miss raises inside nn.Module, slowly
        if moe is not None:
            y, router_logits = moe(h)
            return x + y, router_logits
        return x + self.mlp(h), None


class Decoder(nn.Module):
    """Embedding, blocks and final norm (HF's `model.` prefix)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        # Initialised by Transformer._init_weights; skipping nn.Embedding's own init matters on the
        # meta device, where normal_ takes seconds on first use.
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = make_norm(cfg)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        # Gemma 3's sliding layers: RoPE with their own base and no scaling.
        self.local_rope_cfg = None if cfg.local_rope_theta is None else cfg.replace(
            rope_theta=cfg.local_rope_theta, rope_scaling=RopeScaling())
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if self.lm_head.weight.is_meta:
            return  # built to receive loaded weights: random init would be wasted (and slow on meta)
        self.apply(self._init_weights)
        # GPT-2's residual scaling: keeps the residual stream's variance flat with depth.
        resid_std = 0.02 / math.sqrt(2 * cfg.num_layers)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "w2.weight")):
                nn.init.normal_(p, mean=0.0, std=resid_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, OffsetRMSNorm):
            nn.init.zeros_(module.weight)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def tie_weights(self) -> None:
        """Re-share the LM head with the embedding (after loading with `assign=True`). A quantized
        embedding and head (ember/quant/gguf_embedding.py) share their blocks themselves."""
        if self.config.tie_word_embeddings and isinstance(self.lm_head, nn.Linear) \
                and isinstance(self.model.embed_tokens, nn.Embedding):
            self.lm_head.weight = self.model.embed_tokens.weight

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The residual stream entering the first block: embeddings, scaled by sqrt(hidden) where the
        config says (Gemma; the constant rounded to the embeddings' dtype first, as transformers does)."""
        x = self.model.embed_tokens(input_ids)
        if self.config.embed_scale:
            x = x * torch.tensor(math.sqrt(self.config.hidden_size), dtype=x.dtype)
        return x

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[CosSin | None, CosSin | None]:
        """(global, local) RoPE cos/sin for the positions: the local pair is the sliding layers' own
        base (Gemma 3), else the global pair again; (None, None) without RoPE."""
        if self.config.position != "rope":
            return None, None
        cos_sin = rope_cos_sin(self.config, positions, dtype)
        local = cos_sin if self.local_rope_cfg is None else rope_cos_sin(self.local_rope_cfg, positions, dtype)
        return cos_sin, local

    def hidden(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
               attn: AttentionBackend | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Final-norm hidden states (B, T, D) and the MoE router logits of each layer.

        positions (B, T) are absolute token positions; default 0..T-1 for every row.
        """
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        x = self.embed(input_ids)
        cos_sin, local = self.rope(positions, x.dtype)
        router_logits: list[torch.Tensor] = []
        for layer in self.model.layers:
            x, logits = layer(x, local if layer.self_attn.local_rope else cos_sin, attn)
            if logits is not None:
                router_logits.append(logits)
        return self.model.norm(x), router_logits

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The LM head on final hidden states, soft-capped where the config says (Gemma 2/3)."""
        y = self.lm_head(h)
        cap = self.config.final_logit_softcapping
        return y if cap is None else torch.tanh(y / cap) * cap

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                attn: AttentionBackend | None = None, *, return_aux_loss: bool = False):
        """Logits (B, T, vocab); with return_aux_loss also the MoE load-balancing loss."""
        h, router_logits = self.hidden(input_ids, positions, attn)
        logits = self.logits(h)
        if not return_aux_loss:
            return logits
        return logits, load_balancing_loss(router_logits, self.config)


def load_balancing_loss(router_logits: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """Switch/Mixtral auxiliary loss: E * sum_e (fraction routed to e) * (mean router prob of e).

    Equals 1.0 (times top_k) when routing is perfectly uniform; 0 for dense models. Multiply by
    `cfg.router_aux_loss_coef` when adding it to the language-modelling loss.
    """
    if not router_logits:
        return torch.zeros(())
    logits = torch.cat(router_logits, dim=0).float()  # (layers * N, E)
    probs = torch.softmax(logits, dim=-1)
    _, chosen = torch.topk(probs, cfg.num_experts_per_tok, dim=-1)
    routed = F.one_hot(chosen, cfg.num_experts).float()  # (L*N, k, E)
    tokens_per_expert = routed.mean(dim=0)  # (k, E)
    prob_per_expert = probs.mean(dim=0)  # (E,)
    return (tokens_per_expert * prob_per_expert.unsqueeze(0)).sum() * cfg.num_experts
