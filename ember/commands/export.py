"""Export a model to another runtime's format; today GGUF for llama.cpp.

    ember export --format gguf --type q8_0 --model runs/quickstart/base --out runs/model-q8_0.gguf
    ember export --format gguf --type f16 --model path/to/hf_model --out model-f16.gguf

--type: f32, f16, q8_0 or q4_0 (blocks of 32 per row; norms stay f32). Quantized ember models
(GPTQ, AWQ, NF4, INT8) are dequantized and re-encoded in the chosen type. --model may be a GGUF
file or a known name (smollm2-135m-instruct): its tokenizer, pre-tokenizer name included, is
carried over. A missing --out folder is created; one that cannot be written fails before loading.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ember.checkpoint.hf import load_model
from ember.checkpoint.registry import MODEL_HELP
from ember.quant.gguf import check_writable, export_gguf
from ember.tokenizer import load_tokenizer


@dataclass
class ExportConfig:
    """Write a model folder (HF layout, tokenizer alongside) as a single file for another runtime."""

    model: Path = field(metadata={"help": MODEL_HELP})
    out: Path = field(metadata={"help": "output file, e.g. model.gguf"})
    format: Literal["gguf"] = field(default="gguf", metadata={"help": "target format"})
    type: Literal["f32", "f16", "q8_0", "q4_0"] = field(default="f16", metadata={"help": "tensor type"})
    tokenizer: Path | None = field(default=None, metadata={"help": "tokenizer folder (default: the model folder)"})


CONFIG = ExportConfig


def main(cfg: ExportConfig) -> None:
    check_writable(cfg.out)  # before minutes of loading and quantizing
    tok = load_tokenizer(cfg.tokenizer or cfg.model)
    model = load_model(cfg.model, dtype="float32")
    path = export_gguf(model, tok, cfg.out, cfg.type, name=Path(cfg.model).name)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {cfg.type})")
