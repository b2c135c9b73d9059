"""The embedding and LM head in 8 bits: GGUF Q8_0 blocks, the lookup row-gathered, a tied head
multiplying with the embedding's own blocks (ember/quant/gguf_embedding.py).

At SmolLM2-135M's size the 49152 x 576 vocabulary is a third of the model: in fp32 its 113 MB
stream through every decode step's head, more than all 4-bit blocks together. llama.cpp keeps
it quantized; `ember quantize --quantize-head` does too.

    quantize_head(model)          # in place; model.model.embed_tokens, model.lm_head swapped

Hugging Face's quantization formats quantize only the blocks' linears, so a saved checkpoint
keeps the embedding and head in floating point (transformers reads it unchanged) and records
`"ember_quantized_head": "Q8_0"` in its quantization_config; ember.load_model quantizes them again
on load, to the same blocks (Q8_0 of Q8_0-dequantized values gives back the same blocks).
"""

from __future__ import annotations

import torch
from torch import nn

from ember.errors import EmberError
from ember.quant.gguf_embedding import GGUFEmbedding
from ember.quant.gguf_linear import GGUFLinear

HEAD_KEY = "ember_quantized_head"  # in quantization_config: the head's GGUF type
HEAD_TYPE = "Q8_0"


class HeadQuantizationError(EmberError):
    """An embedding or head that cannot be kept in GGUF blocks."""


def quantize_head(model: nn.Module, ggml_type: str = HEAD_TYPE) -> nn.Module:
    """Swap the model's embedding (and untied LM head) for 8-bit GGUF blocks, in place."""
    embed = model.model.embed_tokens
    if isinstance(embed, GGUFEmbedding):
        return model  # already blocks (a GGUF loaded with keep_quantized)
    if not isinstance(embed, nn.Embedding):
        raise HeadQuantizationError(f"the embedding is a {type(embed).__name__}, which --quantize-head cannot take")
    hidden = embed.weight.shape[1]
    if hidden % 32:
        raise HeadQuantizationError(f"--quantize-head needs a hidden size that is a multiple of 32 (GGUF blocks), "
                                    f"not {hidden}")
    tied = model.config.tie_word_embeddings
    head = model.lm_head
    if not tied and not isinstance(head, nn.Linear):
        raise HeadQuantizationError(f"the LM head is a {type(head).__name__} (an adapter?): merge it first")
    with torch.no_grad():
        new_embed = GGUFEmbedding.from_embedding(embed, ggml_type)
        model.model.embed_tokens = new_embed
        model.lm_head = new_embed.tied_head() if tied else GGUFLinear.from_linear(head, ggml_type)
    return model


def dense_head_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The floating-point `model.embed_tokens.weight` / `lm_head.weight` a checkpoint stores for a
    quantized embedding / head (empty where they are not quantized)."""
    state: dict[str, torch.Tensor] = {}
    embed = model.model.embed_tokens
    if isinstance(embed, GGUFEmbedding):
        state["model.embed_tokens.weight"] = embed.dequantize(embed.dtype)
    if isinstance(model.lm_head, GGUFLinear) and not model.config.tie_word_embeddings:
        state["lm_head.weight"] = model.lm_head.dequantize(embed.dtype if isinstance(embed, GGUFEmbedding)
                                                           else torch.float32)
    return state
