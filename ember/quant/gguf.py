"""GGUF export for llama.cpp, written through the `gguf` package (llama.cpp's own Python writer).

    export_gguf(model, tokenizer, "model.gguf", "q8_0")       # or f32, f16, q4_0
    ember export --format gguf --type q8_0 --model runs/quickstart/base --out model.gguf

What llama.cpp needs from us:
  * tensor names from gguf's HF -> GGUF name map for the architecture (token_embd,
    blk.N.attn_q, ffn_gate, output_norm, ...); a tied LM head is omitted (llama.cpp reuses
    token_embd);
  * for the `llama` architecture, q_proj / k_proj rows permuted from Hugging Face's rotate-half
    RoPE layout back to the interleaved-pairs layout llama.cpp rotates (as its converter does);
    `qwen2` uses rotate-half (NeoX) RoPE itself and takes them unchanged;
  * `falcon` for Falcon's parallel block (llama.cpp's Falcon-7B / 40B: one LayerNorm, or the new
    decoder architecture's two, named through Falcon's HF names; no linear biases, RoPE rotate-half):
    q, k and v stacked in that order as attn_qkv, `attention.layer_norm_epsilon`;
  * hyperparameters under `<arch>.*` keys and the byte-level BPE tokenizer (`gpt2` model,
    tokens, merges, token types with CONTROL for special tokens, special ids, add_bos/add_eos as
    the tokenizer's post-processor does, chat template). The pre-tokenizer name is the one of the
    GGUF the tokenizer was read from (e.g. SmolLM2's "smollm", which llama.cpp splits digits
    with), else "gpt-2";
  * 2-D weights in the chosen type (q8_0 / q4_0 blocks of 32 along a row; rows whose length is not
    a multiple of 32 fall back to f16), 1-D norms and biases in f32.
Quantized ember models are dequantized first. Mixtral, ALiBi and sliding-window models (so Gemma 3,
whose SentencePiece vocabulary ember cannot write either), sequential or biased Falcon blocks (llama.cpp's
Falcon has neither) have no counterpart here and are refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from ember.atomic import atomic_path
from ember.checkpoint.falcon import falcon_name
from ember.errors import EmberError
from ember.model.transformer import Transformer
from ember.quant.gguf_embedding import GGUFEmbedding
from ember.quant.linear import QUANT_LINEARS

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")


class ExportError(EmberError):
    """A model or tokenizer that cannot be written in the requested format."""


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ExportError("GGUF export needs the gguf package: pip install 'ember[quant]'") from None
    return gguf


def permute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection from rotate-half order to interleaved pairs, per head.

    Within a head of dim D, HF row i < D/2 pairs with row i + D/2; llama.cpp wants them at
    rows 2i and 2i + 1.
    """
    out = w.shape[0]
    return w.reshape(n_heads, 2, out // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dense_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Every weight in fp32, quantized layers dequantized, under Hugging Face names."""
    state: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, QUANT_LINEARS):
            state[f"{name}.weight"] = module.dequantize(torch.float32)
            if getattr(module, "bias", None) is not None:
                state[f"{name}.bias"] = module.bias.detach().float()
            continue
        if isinstance(module, GGUFEmbedding):
            state[f"{name}.weight"] = module.dequantize(torch.float32)
            continue
        for pname, p in module.named_parameters(recurse=False):
            state[f"{name}.{pname}" if name else pname] = p.detach().float()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def _falcon_block(cfg) -> bool:
    """Whether cfg is the Falcon block llama.cpp's `falcon` architecture computes."""
    return (cfg.norm == "layernorm" and not cfg.gated_mlp and cfg.mlp_act == "gelu" and cfg.parallel_attn
            and cfg.position == "rope" and not cfg.linear_bias and not cfg.attention_bias and not cfg.qk_norm
            and not cfg.sandwich_norm and not cfg.embed_scale and cfg.attn_scale is None and not cfg.layer_types
            and cfg.final_logit_softcapping is None)


def _arch(model: Transformer):
    gguf = _gguf()

    cfg = model.config
    if cfg.hf_model_type == "falcon" and not _falcon_block(cfg):
        raise ExportError("GGUF export writes Falcon's parallel block with RoPE and no linear biases (what "
                          "llama.cpp's falcon architecture computes); this Falcon is sequential, ALiBi or biased")
    if _falcon_block(cfg) and not cfg.is_moe and cfg.sliding_window is None \
            and cfg.rope_scaling.rope_type == "default":
        return gguf.MODEL_ARCH.FALCON
    if cfg.is_moe or not cfg.llama_block or cfg.sliding_window is not None:
        raise ExportError("GGUF export supports dense Llama-block RoPE models without a sliding window "
                          "(llama and qwen2 families) and Falcon's parallel block; not Gemma 3, sequential "
                          "Falcon or ALiBi models")
    if cfg.rope_scaling.rope_type not in ("default", "linear"):
        raise ExportError(f"GGUF export does not support {cfg.rope_scaling.rope_type!r} RoPE scaling yet "
                          "(default and linear are supported)")
    return gguf.MODEL_ARCH.QWEN2 if cfg.attention_bias else gguf.MODEL_ARCH.LLAMA


def _tensor_type(t: np.ndarray, kind: str):
    gguf = _gguf()

    T = gguf.GGMLQuantizationType
    if t.ndim == 1 or kind == "f32":
        return T.F32
    if kind == "f16" or t.shape[-1] % 32:
        return T.F16
    return T.Q8_0 if kind == "q8_0" else T.Q4_0


def _added_bos_eos(tokenizer) -> tuple[bool, bool]:
    """Whether encoding puts BOS first / EOS last, so llama.cpp tokenizes prompts as ember does."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = bos is not None and len(full) > len(plain) and full[0] == bos and full[1:len(plain) + 1] == plain
    add_eos = eos is not None and len(full) > len(plain) and full[-1] == eos and full[-len(plain) - 1:-1] == plain
    return add_bos, add_eos


def check_writable(out: str | os.PathLike) -> None:
    """Refuse, before the slow part, an `out` that cannot become a file: a folder, a path under
    a file or in a folder we may not write. Missing folders are fine: they are created, as for
    every file ember writes.
    """
    out = Path(out)
    if out.is_dir():
        raise ExportError(f"{out} is a folder: give the file to write, e.g. {out / 'model.gguf'}")
    existing = out.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ExportError(f"cannot write {out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write {out}: no permission to write in {existing}")


def add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """Byte-level BPE vocabulary, merges, token types and special ids in llama.cpp's keys."""
    gguf = _gguf()

    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise ExportError(f"GGUF export needs a byte-level BPE tokenizer, this one is {model.get('type')!r}")
    vocab = dict(model["vocab"])
    for added in spec.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    special = set(tokenizer.all_special_ids) | {a["id"] for a in spec.get("added_tokens", []) if a.get("special")}
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, idx in vocab.items():
        if idx < vocab_size:
            tokens[idx] = text
            types[idx] = gguf.TokenType.CONTROL if idx in special else gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    # The source GGUF's own name keeps llama.cpp splitting text as it did for the original file.
    writer.add_tokenizer_pre(tokenizer.gguf_pre or "gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    unk_id = None if tokenizer.unk_token is None else tokenizer.token_to_id(tokenizer.unk_token)
    for setter, idx in ((writer.add_bos_token_id, tokenizer.bos_token_id),
                        (writer.add_eos_token_id, tokenizer.eos_token_id),
                        (writer.add_pad_token_id, tokenizer.pad_token_id),
                        (writer.add_unk_token_id, unk_id)):
        if idx is not None:
            setter(idx)
    add_bos, add_eos = _added_bos_eos(tokenizer)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def export_gguf(model: Transformer, tokenizer, out: str | os.PathLike, kind: str = "f16",
                name: str = "ember") -> Path:
    """Write model + tokenizer as one GGUF file (atomically); returns its path."""
    gguf = _gguf()

    if kind not in GGUF_TYPES:
        raise ExportError(f"unknown GGUF type {kind!r}; choose one of {', '.join(GGUF_TYPES)}")
    arch = _arch(model)
    check_writable(out)
    cfg = model.config
    names = gguf.get_tensor_name_map(arch, cfg.num_layers)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[kind]
    out = Path(out)
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[arch])
        writer.add_name(name)
        writer.add_context_length(cfg.max_position_embeddings)
        writer.add_embedding_length(cfg.hidden_size)
        writer.add_block_count(cfg.num_layers)
        writer.add_feed_forward_length(cfg.intermediate_size)
        writer.add_head_count(cfg.num_heads)
        writer.add_head_count_kv(cfg.n_kv_heads)
        writer.add_key_length(cfg.d_head)
        writer.add_value_length(cfg.d_head)
        writer.add_rope_dimension_count(cfg.d_head)
        if arch == gguf.MODEL_ARCH.FALCON:
            writer.add_layer_norm_eps(cfg.rms_norm_eps)
        else:
            writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        writer.add_rope_freq_base(cfg.rope_theta)
        if cfg.rope_scaling.rope_type == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(cfg.rope_scaling.factor)
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_tokenizer(writer, tokenizer, cfg.vocab_size)
        state = dense_state_dict(model)
        if arch == gguf.MODEL_ARCH.FALCON:  # attn_qkv: q, k, v stacked, as llama.cpp's converter writes it
            state = {falcon_name(k, cfg): (torch.cat([state[k.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")])
                                           if ".q_proj." in k else t)
                     for k, t in state.items() if ".k_proj." not in k and ".v_proj." not in k}
        for hf_name, t in state.items():
            gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise ExportError(f"no GGUF name for tensor {hf_name!r}")
            if arch == gguf.MODEL_ARCH.LLAMA and hf_name.endswith("q_proj.weight"):
                t = permute_rope_rows(t, cfg.num_heads)
            elif arch == gguf.MODEL_ARCH.LLAMA and hf_name.endswith("k_proj.weight"):
                t = permute_rope_rows(t, cfg.n_kv_heads)
            data = t.numpy()
            qtype = _tensor_type(data, kind)
            writer.add_tensor(gguf_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out
