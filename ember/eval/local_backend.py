"""The in-process backend: an ember model and its tokenizer in this Python process.

    backend = LocalBackend.from_dir("runs/quickstart/base")
    backend.loglikelihood([("Question: ...\\nAnswer:", " B")])

Likelihoods are direct batched forwards (ember.eval.loglikelihood.score_spans). Generation
goes through `_generate_ids`, the one place that decodes: today the naive reference decoder
(ember.model.generate), one prompt at a time; when the serving engine lands it becomes a
single `ember.LLM(...).generate(prompts, SamplingParams(...))` call there.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from ember.eval.backend import GenerationParams, Prompt, TokenBackend, cut_at_stop
from ember.eval.loglikelihood import Span, score_spans
from ember.model.generate import generate, stop_token_ids


class LocalBackend(TokenBackend):
    """Evaluate an ember model (any nn.Module with `.config`) with its tokenizer."""

    def __init__(self, model: torch.nn.Module, tokenizer, name: str = "model", batch_size: int = 8,
                 max_len: int | None = None, stride: int | None = None, progress: bool = False) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.batch_size = batch_size
        self.max_len = max_len or model.config.max_position_embeddings
        self.stride = stride
        self.progress = progress
        self.device = next(model.parameters()).device

    @classmethod
    def from_dir(cls, path: str | Path, tokenizer: str | Path | None = None, dtype: str = "float32",
                 **kwargs) -> LocalBackend:
        """Load a model folder (HF layout) and its tokenizer (default: the same folder)."""
        from ember.checkpoint.hf import load_model
        from ember.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer or path)
        model = load_model(path, dtype=dtype)
        if torch.cuda.is_available():
            model = model.cuda()
        return cls(model, tok, name=str(path), **kwargs)

    def score_spans(self, spans: Sequence[Span]) -> list[tuple[float, bool]]:
        out: list[tuple[float, bool]] = []
        step = self.batch_size * 8  # progress granularity; score_spans batches inside
        for i in tqdm(range(0, len(spans), step), desc="log-likelihood", unit="batch",
                      disable=not self.progress or len(spans) <= step):
            out += score_spans(self.model, spans[i:i + step], self.batch_size, self.device)
        return out

    def generate(self, prompts: Sequence[Prompt], params: GenerationParams) -> list[str]:
        ids = [self.prompt_ids(p, params) for p in prompts]
        outs = self._generate_ids(ids, params)
        return [cut_at_stop(self.tokenizer.decode(o, skip_special_tokens=True), params.stop) for o in outs]

    def _generate_ids(self, prompts: list[list[int]], params: GenerationParams) -> list[list[int]]:
        """New token ids for each prompt, ending before the first EOS (the engine swap point)."""
        eos = stop_token_ids(self.model.config, self.tokenizer.eos_token_id)
        outs = []
        for ids in tqdm(prompts, desc="generate", unit="prompt", disable=not self.progress):
            x = torch.tensor([ids], device=self.device)
            y = generate(self.model, x, params.max_tokens, temperature=params.temperature,
                         eos_token_ids=eos, seed=params.seed)[0, len(ids):].tolist()
            end = next((i for i, t in enumerate(y) if t in eos), len(y))
            outs.append(y[:end])
        return outs
