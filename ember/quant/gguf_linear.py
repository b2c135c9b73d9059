"""GGUFLinear: a Linear that keeps a GGUF tensor's Q8_0 / Q4_0 / Q4_1 blocks exactly as the file
stores them, and computes from them (no requantization, so no quality lost on the way).

GGUF cuts every row (one output channel) into blocks of 32 weights:

    Q8_0  34 bytes   fp16 d, int8 q[32]                           w = d * q
    Q4_0  18 bytes   fp16 d, 16 bytes: q[j] low nibble of byte j,  w = d * (q - 8)
                                       q[j + 16] its high nibble
    Q4_1  20 bytes   fp16 d, fp16 m, 16 bytes as Q4_0              w = d * q + m

so a (out, in) weight is a uint8 array (out, in / 32 * block bytes), which is what a GGUF
reader returns for the tensor (GGUF lists the shape as (in, out)). The native kernels
(ember/engine/kernels/quant_linear.c) read these blocks in place; `dequantize` is the PyTorch
reference.

    layer = GGUFLinear(blocks, "Q4_0", (out_features, in_features))   # blocks: uint8 (out, bytes)
    layer = GGUFLinear.from_linear(nn.Linear(576, 1536), "Q8_0")        # quantized by the gguf package
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ember.quant.base import QuantLinear
from ember.quant.native_layout import PackedWeight, pack_gguf

GGUF_BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}


def dequantize_gguf(blocks: torch.Tensor, ggml_type: str, in_features: int) -> torch.Tensor:
    """fp32 (out, in) weight of GGUF blocks (out, row bytes)."""
    out_f = blocks.shape[0]
    b = blocks.reshape(out_f, in_features // 32, GGUF_BLOCK_BYTES[ggml_type])

    def half(lo: int) -> torch.Tensor:  # an fp16 field of every block, (out, blocks, 1) fp32
        return b[..., lo:lo + 2].contiguous().view(torch.float16).float()

    d = half(0)
    if ggml_type == "Q8_0":
        w = d * b[..., 2:].contiguous().view(torch.int8).float()
    else:
        qs = b[..., 2:18] if ggml_type == "Q4_0" else b[..., 4:20]
        q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).float()
        w = d * (q - 8) if ggml_type == "Q4_0" else d * q + half(2)
    return w.reshape(out_f, in_features)


class GGUFLinear(QuantLinear):
    """A weight in GGUF Q8_0 / Q4_0 / Q4_1 blocks (state: `blocks` uint8 (out, row bytes)), with an
    optional fp32 bias."""

    def __init__(self, blocks: torch.Tensor, ggml_type: object, shape: tuple[int, int],
                 bias: torch.Tensor | None = None) -> None:
        """blocks: the tensor's raw blocks, uint8 (out, row bytes) or any shape of that many bytes;
        ggml_type: "Q8_0", "Q4_0" or "Q4_1" (or a gguf.GGMLQuantizationType); shape: (out, in)."""
        name = str(getattr(ggml_type, "name", ggml_type)).upper()
        if name not in GGUF_BLOCK_BYTES:
            raise ValueError(f"GGUFLinear holds {', '.join(GGUF_BLOCK_BYTES)} blocks, not {name}")
        out_f, in_f = shape
        if in_f % 32:
            raise ValueError(f"GGUF blocks cover rows of a multiple of 32 weights, not {in_f}")
        row_bytes = in_f // 32 * GGUF_BLOCK_BYTES[name]
        blocks = torch.as_tensor(blocks)
        if blocks.dtype != torch.uint8 or blocks.numel() != out_f * row_bytes:
            raise ValueError(f"{name} blocks of a ({out_f}, {in_f}) weight are {out_f * row_bytes} uint8 bytes, "
                             f"got {blocks.numel()} {blocks.dtype}")
        super().__init__(in_f, out_f, bias is not None, torch.float32)
        self.ggml_type = name
        self.register_buffer("blocks", blocks.reshape(out_f, row_bytes).contiguous())
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, ggml_type: str) -> "GGUFLinear":
        """Quantize a Linear with the gguf package (llama.cpp's own Python quantizer)."""
        from ember.quant.gguf import _gguf

        gguf = _gguf()
        w = linear.weight.detach().float().cpu().numpy()
        blocks = gguf.quants.quantize(w, gguf.GGMLQuantizationType[ggml_type.upper()])
        return cls(torch.from_numpy(blocks), ggml_type, tuple(linear.weight.shape), linear.bias)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_gguf(self.blocks, self.ggml_type, self.in_features).to(dtype)

    def _pack_sources(self) -> tuple[torch.Tensor, ...]:
        return (self.blocks,)

    def _pack(self) -> PackedWeight | None:
        return pack_gguf(self.blocks, self.ggml_type.lower(), self.in_features)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", ggml_type={self.ggml_type}"
