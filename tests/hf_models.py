"""Tiny random Hugging Face models of each supported family, built and saved by transformers.

Used as the reference in parity tests: ember must reproduce transformers' logits and
generations on the same weights. Weights use a larger init than HF's default so logits are
spread out and greedy decoding is not decided by rounding noise.
"""

from __future__ import annotations

from pathlib import Path

import torch

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0)

# Falcon's own field names (no intermediate_size / num_key_value_heads): replaces COMMON.
FALCON = dict(vocab_size=128, hidden_size=64, ffn_hidden_size=96, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=256, initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0)

GEMMA3 = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=8,
              max_position_embeddings=256, initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0)

FAMILIES = {
    "llama-gqa-llama3-rope": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64})),
    "llama-linear-rope": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})),
    "llama-dynamic-rope-mqa": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_key_value_heads=1, max_position_embeddings=16,  # sequences outgrow it: NTK kicks in
        rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})),
    "mistral-sliding-window": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=8)),
    "qwen2-bias-tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "mixtral-4x2": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    # Falcon-7B's shape: multi-query, one LayerNorm feeding attention and MLP in parallel.
    "falcon-mqa-parallel": ("FalconConfig", "FalconForCausalLM", dict(
        FALCON, multi_query=True, parallel_attn=True, new_decoder_architecture=False)),
    # Falcon-40B's: the new decoder architecture (ln_attn + ln_mlp), GQA, biases untied head.
    "falcon-new-arch-gqa": ("FalconConfig", "FalconForCausalLM", dict(
        FALCON, new_decoder_architecture=True, num_kv_heads=2, bias=True, tie_word_embeddings=False)),
    # Falcon-RW's: ALiBi, sequential block, multi-head, biases.
    "falcon-rw-alibi": ("FalconConfig", "FalconForCausalLM", dict(
        FALCON, alibi=True, multi_query=False, parallel_attn=False, bias=True)),
    # Gemma 3: sliding and full layers interleaved (window 8 < the test lengths), each with its RoPE base.
    "gemma3-interleaved": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        GEMMA3, layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"])),
    # ... multi-query, final-logit soft-capping, linear RoPE scaling on the full layers, untied head.
    "gemma3-mqa-softcap": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        GEMMA3, num_key_value_heads=1, final_logit_softcapping=5.0, tie_word_embeddings=False,
        layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}})),
}


def make_hf_model(family: str, out: Path, seed: int = 0, **overrides):
    """Create a tiny random transformers model of `family`, save it to `out`, return it (eval).

    overrides: config fields over the family's (e.g. a vocab_size matching a tokenizer)."""
    import transformers

    cfg_name, model_name, extra = FAMILIES[family]
    own = cfg_name in ("FalconConfig", "Gemma3TextConfig")  # their own field names replace COMMON
    cfg = getattr(transformers, cfg_name)(**{**(extra if own else {**COMMON, **extra}), **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg).eval()
    if own:  # norm weights (and biases) off their init, so both are tested
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name and p.dim() == 1:
                    p.normal_(1.0 if name.endswith("weight") and cfg_name == "FalconConfig" else 0.0, 0.2)
    model.save_pretrained(out)
    return model
