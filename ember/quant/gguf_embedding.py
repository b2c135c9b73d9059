"""GGUFEmbedding: a token embedding kept in GGUF blocks (Q8_0, Q4_0 or Q4_1), whose lookup
dequantizes only the rows it gathers.

llama.cpp keeps `token_embd` quantized and, for a tied model, multiplies the LM head with the
same blocks. ember does the same: the embedding's `blocks` buffer is the very tensor a
GGUFLinear head holds (`tied_head()`), so a tied 8-bit vocabulary costs its bytes once
(SmolLM2-135M: 49152 x 576 Q8_0 = 30 MB, against 113 MB in fp32).

    emb = GGUFEmbedding(blocks, "Q8_0", (vocab, hidden))     # blocks: uint8 (vocab, row bytes)
    emb = GGUFEmbedding.from_embedding(nn.Embedding(...), "Q8_0")
    head = emb.tied_head()                                   # a GGUFLinear over the same blocks
"""

from __future__ import annotations

import torch
from torch import nn

from ember.engine import native
from ember.quant.gguf_linear import GGUFLinear, dequantize_gguf


class GGUFEmbedding(nn.Module):
    """nn.Embedding's forward (ids (...) -> (..., hidden)) over rows of GGUF blocks."""

    def __init__(self, blocks: torch.Tensor, ggml_type: object, shape: tuple[int, int],
                 dtype: torch.dtype = torch.float32) -> None:
        """shape: (num_embeddings, embedding_dim); dtype: the dtype lookups return."""
        super().__init__()
        # GGUFLinear validates the blocks; the embedding is the same bytes read by rows.
        check = GGUFLinear(blocks, ggml_type, shape)
        self.num_embeddings, self.embedding_dim = shape
        self.ggml_type = check.ggml_type
        self.dtype = dtype
        self.register_buffer("blocks", check.blocks)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, ggml_type: str = "Q8_0") -> GGUFEmbedding:
        """Quantize an embedding's rows with the gguf package (llama.cpp's own quantizer)."""
        linear = GGUFLinear.from_linear(_as_linear(embedding.weight), ggml_type)
        return cls(linear.blocks, ggml_type, tuple(embedding.weight.shape), embedding.weight.dtype)

    def tied_head(self) -> GGUFLinear:
        """An LM head (hidden -> vocab) that multiplies with these same blocks (no copy)."""
        head = GGUFLinear(self.blocks, self.ggml_type, (self.num_embeddings, self.embedding_dim))
        head.blocks = self.blocks  # the same tensor object, so a later .to() or reload keeps them one
        return head

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        flat = input_ids.reshape(-1)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise IndexError(f"token id out of range for an embedding of {self.num_embeddings} rows")
        rows = self.blocks.index_select(0, flat.to(self.blocks.device))
        if rows.device.type == "cpu" and native.available():
            dense = native.quant_dequantize(self.ggml_type.lower(), rows, None, self.embedding_dim)
        else:
            dense = dequantize_gguf(rows, self.ggml_type, self.embedding_dim)
        return dense.to(self.dtype).view(*input_ids.shape, self.embedding_dim)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense (num_embeddings, embedding_dim) table."""
        return dequantize_gguf(self.blocks, self.ggml_type, self.embedding_dim).to(dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, ggml_type={self.ggml_type}"


def _as_linear(weight: torch.Tensor) -> nn.Linear:
    with torch.device("meta"):
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
    return linear

