"""LLM: the offline, vLLM-shaped facade over the engine.

    from ember import LLM, SamplingParams
    llm = LLM("path/to/hf_dir", max_num_seqs=64, kv_cache_memory=2.0)
    outs = llm.generate(["Hello", "def f(x):"], SamplingParams(temperature=0, max_tokens=32))
    outs[0].outputs[0].text, outs[0].outputs[0].token_ids, outs[0].outputs[0].finish_reason
    llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=64))

Prompts are strings, token-id lists, or {"prompt": str} / {"prompt_token_ids": [...]} dicts;
sampling_params is one SamplingParams or one per prompt. All requests go in together and run
with continuous batching; outputs come back in prompt order.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ember.engine.config import EngineConfig
from ember.engine.engine import LLMEngine, RequestError
from ember.engine.request import RequestOutput
from ember.engine.sampling_params import SamplingParams
from ember.model.transformer import Transformer
from ember.tokenizer import Tokenizer, load_tokenizer

Prompt = str | list[int] | Mapping[str, Any]


class LLM:
    """Load a model (folder or Transformer) and its tokenizer, and generate with the paged engine."""

    def __init__(self, model: str | os.PathLike | Transformer, tokenizer: str | os.PathLike | Tokenizer | None = None,
                 *, dtype: str = "float32", device: str | None = None, skip_tokenizer_init: bool = False,
                 adapter: str | os.PathLike | None = None, keep_quantized: bool | None = None,
                 **engine_config: Any) -> None:
        """keep_quantized: for a GGUF model, run its Q8_0/Q4_0/Q4_1 blocks as they are (the default
        with dtype float32, as llama.cpp does) rather than dequantizing them (ember.load_model)."""
        if isinstance(model, Transformer):
            if adapter is not None:
                raise RequestError("adapter= applies to a model folder; apply it to a Transformer yourself")
            module = model
        else:
            from ember.adapters.lora import merge_where_possible
            from ember.checkpoint.hf import load_model

            if keep_quantized is None:
                keep_quantized = dtype == "float32"
            module = load_model(model, dtype=dtype, adapter=adapter, keep_quantized=keep_quantized)
            if adapter is not None:
                merge_where_possible(module)
            if tokenizer is None and not skip_tokenizer_init:
                tokenizer = model
        if device is not None:
            module = module.to(device)
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer(tokenizer)
        self.engine = LLMEngine(module, tokenizer, EngineConfig(**engine_config))
        self._ids = itertools.count()

    def close(self) -> None:
        """Stop a parallel engine's worker ranks (LLM(tensor_parallel_size=N)); no-op otherwise."""
        self.engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get_tokenizer(self) -> Tokenizer | None:
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Generate for every prompt; one RequestOutput per prompt, in order."""
        prompts = _as_list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = [sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams) \
            else list(sampling_params)
        if len(params) != len(prompts):
            raise RequestError(f"got {len(params)} SamplingParams for {len(prompts)} prompts: give one, or one each")
        ids = [f"llm-{next(self._ids)}" for _ in prompts]
        try:
            for rid, prompt, p in zip(ids, prompts, params):
                self.engine.add_request(rid, _prompt_input(prompt), p)
        except Exception:
            for rid in ids:
                self.engine.abort(rid)
            raise
        finished: dict[str, RequestOutput] = {}
        with torch.inference_mode():
            while len(finished) < len(ids):
                for out in self.engine.step():
                    if out.finished:
                        finished[out.request_id] = out
        return [finished[rid] for rid in ids]

    def chat(self, messages: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             **template_kwargs: Any) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, through the chat template."""
        tok = self.engine.tokenizer
        if tok is None:
            raise RequestError("chat needs a tokenizer with a chat template")
        convs = [messages] if messages and isinstance(messages[0], Mapping) else list(messages)
        prompts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True, **template_kwargs)
                   for c in convs]
        return self.generate(prompts, sampling_params)


def _as_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, (str, Mapping)):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt given as token ids
    return prompts


def _prompt_input(prompt: Prompt) -> str | list[int]:
    if isinstance(prompt, Mapping):
        if "prompt_token_ids" in prompt:
            return list(prompt["prompt_token_ids"])
        if "prompt" in prompt:
            return str(prompt["prompt"])
        raise RequestError("a prompt dict needs a 'prompt' or a 'prompt_token_ids' key")
    if isinstance(prompt, str):
        return prompt
    return list(prompt)
