"""Evaluate a model folder, or any OpenAI-compatible server, on one task; print a table, write JSON.

    ember eval --model runs/quickstart/base --task mmlu                       # the bundled sample set
    ember eval --model DIR --task mmlu --data mmlu/data --num-fewshot 5 --out mmlu.json
    ember eval --base-url http://127.0.0.1:8000 --tokenizer DIR --task truthfulqa --data mc_task.json
    ember eval --model DIR --task gsm8k --data gsm8k/ --limit 100
    ember eval --model DIR --task perplexity --data notes.txt --max-len 512 --stride 256
    ember eval --base-url URL --task mtbench --data question.jsonl --judge-url http://judge:8000 \\
               --baseline other_model.json

Without --data a task runs on the small sample set ember ships in the benchmark's format
(ember/eval/data/). Tasks, prompts and metrics follow lm-evaluation-harness; see ember/eval/tasks.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ember.checkpoint.registry import MODEL_HELP
from ember.eval.backend import Backend
from ember.eval.datafile import sample_data
from ember.eval.results import format_table, write_results
from ember.eval.tasks import TaskOptions, run_task

log = logging.getLogger(__name__)
SAMPLE_FILES = {"perplexity": "perplexity/python_notes.jsonl", "mmlu": "mmlu", "gsm8k": "gsm8k",
                "truthfulqa": "truthfulqa/mc_task.jsonl", "mtbench": "mtbench/question.jsonl"}


@dataclass
class EvalConfig:
    """Evaluate a model (--model DIR, in process) or a server (--base-url URL) on one task."""

    task: Literal["perplexity", "mmlu", "gsm8k", "truthfulqa", "mtbench"] = field(
        metadata={"help": "what to measure"})
    model: Path | None = field(default=None, metadata={"help": MODEL_HELP})
    base_url: str | None = field(default=None, metadata={
        "help": "OpenAI-compatible server to evaluate instead, e.g. http://127.0.0.1:8000"})
    served_model: str | None = field(default=None, metadata={
        "help": "model name to send to the server; unset: the first of its /v1/models"})
    tokenizer: Path | None = field(default=None, metadata={
        "help": "tokenizer folder; unset: --model's; with --base-url, needed for log-likelihood tasks"})
    data: Path | None = field(default=None, metadata={
        "help": "benchmark file or folder in the public format; unset: ember's sample set"})
    num_fewshot: int | None = field(default=None, metadata={
        "help": "few-shot examples; unset: the task's (mmlu 0, gsm8k 5)"})
    limit: int | None = field(default=None, metadata={"help": "evaluate only the first N items"})
    batch_size: int = field(default=8, metadata={"help": "sequences per forward / prompts per request"})
    max_tokens: int = field(default=256, metadata={"help": "generation budget per answer (gsm8k, mtbench)"})
    max_len: int | None = field(default=None, metadata={
        "help": "tokens per forward; unset: the model's context, or the server's max_model_len - 2"})
    stride: int | None = field(default=None, metadata={
        "help": "perplexity window stride; unset: max_len (disjoint windows, as the harness)"})
    chat: bool = field(default=False, metadata={"help": "gsm8k: send the prompt through the chat template"})
    mmlu_style: Literal["letters", "continuation"] = field(default="letters", metadata={
        "help": "mmlu: score the letters (mmlu) or the answer texts (mmlu_continuation)"})
    judge_url: str | None = field(default=None, metadata={"help": "mtbench: OpenAI-compatible judge server"})
    judge_model: str | None = field(default=None, metadata={"help": "mtbench: judge model name on that server"})
    baseline: Path | None = field(default=None, metadata={
        "help": "mtbench: another model's answers (results JSON or FastChat jsonl) to judge pairwise against"})
    out: Path | None = field(default=None, metadata={"help": "write the results JSON here"})
    dtype: str = field(default="float32", metadata={"help": "--model weights dtype: float32, bfloat16, float16"})

    def __post_init__(self) -> None:
        if (self.model is None) == (self.base_url is None):
            raise ValueError("give exactly one of --model DIR (in process) or --base-url URL (a server)")
        for name in ("batch_size", "max_tokens", "max_len", "stride", "limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ValueError(f"--num-fewshot must be >= 0, got {self.num_fewshot}")


def make_backend(cfg: EvalConfig) -> Backend:
    """The backend the config names (in-process model or HTTP server)."""
    common = dict(batch_size=cfg.batch_size, max_len=cfg.max_len, stride=cfg.stride, progress=True)
    if cfg.model is not None:
        from ember.eval.local_backend import LocalBackend

        return LocalBackend.from_dir(cfg.model, tokenizer=cfg.tokenizer, dtype=cfg.dtype, **common)
    from ember.eval.http_backend import OpenAIBackend

    tok = None
    if cfg.tokenizer is not None:
        from ember.tokenizer import load_tokenizer

        tok = load_tokenizer(cfg.tokenizer)
    return OpenAIBackend(cfg.base_url, model=cfg.served_model, tokenizer=tok, **common)


def options(cfg: EvalConfig) -> TaskOptions:
    judge = None
    if cfg.judge_url:
        from ember.eval.http_backend import OpenAIBackend

        judge = OpenAIBackend(cfg.judge_url, model=cfg.judge_model, batch_size=cfg.batch_size, progress=True)
    return TaskOptions(num_fewshot=cfg.num_fewshot, limit=cfg.limit, max_tokens=cfg.max_tokens, chat=cfg.chat,
                       mmlu_style=cfg.mmlu_style, judge=judge, baseline=cfg.baseline)


def main(cfg: EvalConfig):
    backend = make_backend(cfg)
    data = cfg.data or sample_data(SAMPLE_FILES[cfg.task])
    result = run_task(cfg.task, backend, data, options(cfg))
    model = str(cfg.model) if cfg.model is not None else f"{backend.name} @ {cfg.base_url}"
    print(f"{cfg.task} on {data} — {model}")
    print(format_table(result.metrics))
    if cfg.out is not None:
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}
        write_results(cfg.out, result, model, config)
        print(f"results written to {cfg.out}")
    return result


CONFIG = EvalConfig
