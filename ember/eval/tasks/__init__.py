"""Evaluation tasks, one module each, all run through a Backend:

    perplexity  rolling log-likelihood of text files: word/byte/token perplexity, bits per byte
    mmlu        four-choice questions by log-likelihood (MMLU csv), acc and acc_norm
    gsm8k       chain-of-thought few-shot generation (GSM8K jsonl), strict and flexible extraction
    truthfulqa  MC1 and MC2 by log-likelihood (TruthfulQA multiple-choice json/jsonl)
    mtbench     multi-turn chat answers graded by an LLM judge (MT-Bench question.jsonl)

    result = run_task("mmlu", backend, Path("data/mmlu"), TaskOptions(num_fewshot=5))
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ember.errors import EmberError
from ember.eval.backend import Backend
from ember.eval.results import TaskResult

TASK_NAMES = ("perplexity", "mmlu", "gsm8k", "truthfulqa", "mtbench")


@dataclass
class TaskOptions:
    """Settings shared by the tasks; each reads the ones it uses."""

    num_fewshot: int | None = None  # None: the task's default (harness: mmlu 0, gsm8k 5, truthfulqa 0)
    limit: int | None = None  # evaluate only the first N items (per subject for mmlu)
    max_tokens: int = 256  # generation budget (gsm8k, mtbench answers)
    chat: bool = False  # gsm8k: send the prompt as one user message through the chat template
    mmlu_style: str = "letters"  # "letters" (mmlu) or "continuation" (mmlu_continuation)
    judge: Backend | None = None  # mtbench: the judge model
    baseline: Path | None = None  # mtbench: answers of another model for pairwise judging
    judge_max_tokens: int = 2048


def run_task(name: str, backend: Backend, data: Path, options: TaskOptions) -> TaskResult:
    """Run one task by name on the data at `data` (a file or folder in the benchmark's format)."""
    from ember.eval.tasks import gsm8k, mmlu, mtbench, perplexity, truthfulqa

    modules = {"perplexity": perplexity, "mmlu": mmlu, "gsm8k": gsm8k, "truthfulqa": truthfulqa,
               "mtbench": mtbench}
    if name not in modules:
        raise EmberError(f"unknown task {name!r}; choose one of {', '.join(TASK_NAMES)}")
    if options.limit is not None and options.limit < 1:
        raise EmberError(f"--limit must be at least 1, got {options.limit}")
    return modules[name].evaluate(backend, data, options)
