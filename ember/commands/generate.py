"""Continue a prompt with a model, using the naive contiguous-KV-cache decoder.

    ember generate --model runs/quickstart/base --prompt "def fibonacci(n):" --max-tokens 64
    ember generate --model DIR --prompt "What is a list?" --chat --temperature 0.7 --top-p 0.9
    ember generate --model DIR --adapter runs/quickstart/dpo --prompt "What is a list?" --chat
    ember generate --model smollm2-135m-instruct --prompt "Paris is" --tensor-parallel-size 2

With --tensor-parallel-size or --pipeline-parallel-size above 1 the prompt goes through the serving
engine instead, split across processes (ember/parallel); greedy output is the same tokens.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ember.adapters.lora import merge_where_possible
from ember.checkpoint.hf import load_model
from ember.checkpoint.registry import MODEL_HELP
from ember.model.generate import generate, stop_token_ids
from ember.model.transformer import Transformer
from ember.tokenizer import Tokenizer, load_tokenizer


@dataclass
class GenerateConfig:
    """Generate text from a prompt with a model folder (HF layout; its tokenizer alongside)."""

    model: Path = field(metadata={"help": MODEL_HELP})
    prompt: str = field(metadata={"help": "text to continue"})
    max_tokens: int = field(default=64, metadata={"help": "tokens to generate"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy"})
    top_k: int = field(default=0, metadata={"help": "keep the k most likely tokens (0 = all)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass"})
    seed: int | None = field(default=None, metadata={"help": "random seed for sampling"})
    chat: bool = field(default=False, metadata={"help": "wrap the prompt in the chat template as a user turn"})
    tokenizer: Path | None = field(default=None, metadata={"help": "tokenizer folder (default: the model folder)"})
    dtype: str = field(default="float32", metadata={"help": "float32, bfloat16 or float16"})
    adapter: Path | None = field(default=None, metadata={"help": "PEFT LoRA adapter folder to apply (merged into a full-precision base)"})
    tensor_parallel_size: int = field(default=1, metadata={
        "help": "above 1: generate through the engine, the model split across this many processes"})
    pipeline_parallel_size: int = field(default=1, metadata={
        "help": "above 1: generate through the engine, the layers split into this many stages"})


CONFIG = GenerateConfig


def main(cfg: GenerateConfig) -> None:
    tok = load_tokenizer(cfg.tokenizer or cfg.model)
    model = load_model(cfg.model, dtype=cfg.dtype, adapter=cfg.adapter)
    if cfg.adapter is not None:
        merge_where_possible(model)  # unmerged over a quantized base, as in serve and chat
    if cfg.chat:
        ids = tok.apply_chat_template([{"role": "user", "content": cfg.prompt}],
                                      add_generation_prompt=True, tokenize=True)
    else:
        ids = tok.encode(cfg.prompt)
    if not ids:
        ids = [tok.bos_token_id if tok.bos_token_id is not None else 0]
    eos = stop_token_ids(model.config, tok.eos_token_id)
    if cfg.tensor_parallel_size > 1 or cfg.pipeline_parallel_size > 1:
        new = _engine_generate(cfg, model, tok, ids)
    else:
        out = generate(model, torch.tensor([ids]), cfg.max_tokens, temperature=cfg.temperature,
                       top_k=cfg.top_k, top_p=cfg.top_p, eos_token_ids=eos, seed=cfg.seed)
        new = out[0, len(ids):].tolist()
    new = [t for t in new if t not in eos]
    text = tok.decode(new, skip_special_tokens=True)
    sys.stdout.write((text if cfg.chat else cfg.prompt + text) + "\n")


def _engine_generate(cfg: GenerateConfig, model: Transformer, tok: Tokenizer, ids: list[int]) -> list[int]:
    """The continuation through the serving engine, split across processes."""
    from ember.engine import LLM, SamplingParams

    params = SamplingParams(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, seed=cfg.seed,
                            max_tokens=cfg.max_tokens)
    with LLM(model, tok, kv_cache_memory=0.25, tensor_parallel_size=cfg.tensor_parallel_size,
             pipeline_parallel_size=cfg.pipeline_parallel_size) as llm:
        return list(llm.generate([ids], params)[0].outputs[0].token_ids)
