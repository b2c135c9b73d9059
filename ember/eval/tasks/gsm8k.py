"""GSM8K-style grade-school maths by generation, as lm-evaluation-harness's `gsm8k` task.

Data: GSM8K jsonl, {"question": ..., "answer": "<worked solution>\\n#### <number>"} per line:
`test.jsonl` for the questions and `train.jsonl` beside it for the few-shot examples (the first
k, in file order). The few-shot answers are worked solutions, so the prompt is a
chain-of-thought prompt (default k = 5, the harness's):

    Question: <train q>\\nAnswer: <worked solution ... #### 18>\\n\\n     (k times)
    Question: <q>\\nAnswer:

Greedy generation stops at "Question:", "</s>" or "<|im_end|>". Two answer extractions, each
scored by exact match against the number after "####" in the reference:

    strict-match      the first  "#### (-?[0-9.,]+)"              in the generation
    flexible-extract  the last   "(-?[$0-9.,]{2,})|(-?[0-9]+)"     in the generation

Before comparing, both sides drop ",", "$", everything up to "#### " and a final "." and are
lower-cased (the harness's exact_match settings). With --chat the whole prompt is sent as one
user message through the model's chat template.
"""

from __future__ import annotations

import re
from pathlib import Path

from ember.eval.backend import Backend, GenerationParams
from ember.eval.datafile import EvalDataError, existing, fewshot_split, read_records, require
from ember.eval.results import Metric, TaskResult
from ember.eval.stats import mean, mean_stderr
from ember.eval.tasks import TaskOptions

STOP = ("Question:", "</s>", "<|im_end|>")
STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
IGNORE = (re.compile(","), re.compile(r"\$"), re.compile(r"(?s).*#### "), re.compile(r"\.$"))
INVALID = "[invalid]"  # what the harness's regex filter yields when nothing matches
DEFAULT_FEWSHOT = 5


def extract(text: str, pattern: re.Pattern, group_select: int) -> str:
    """The harness's regex filter: findall, pick a match, first non-empty group, strip."""
    found = pattern.findall(text)
    if not found:
        return INVALID
    match = found[group_select]
    if isinstance(match, tuple):
        match = next((m for m in match if m), INVALID)
    return match.strip()


def strict_match(text: str) -> str:
    return extract(text, STRICT, 0)


def flexible_extract(text: str) -> str:
    return extract(text, FLEXIBLE, -1)


def normalise(text: str) -> str:
    for pattern in IGNORE:
        text = pattern.sub("", text)
    return text.lower()


def exact_match(prediction: str, reference: str) -> float:
    return float(normalise(prediction) == normalise(reference))


def read_problems(path: Path) -> list[tuple[str, str]]:
    problems = []
    for i, record in enumerate(read_records(path), 1):
        where = f"{path} record {i}"
        answer = require(record, "answer", str, where)
        if "####" not in answer:
            raise EvalDataError(f"{where}: the answer must end with '#### <number>'")
        problems.append((require(record, "question", str, where), answer))
    if not problems:
        raise EvalDataError(f"{path} holds no problems")
    return problems


def test_file(data: Path) -> Path:
    data = existing(data, "GSM8K data")
    if data.is_file():
        return data
    for name in ("test.jsonl", "test.json"):
        if (data / name).is_file():
            return data / name
    raise EvalDataError(f"no test.jsonl in {data} (GSM8K layout: test.jsonl and train.jsonl)")


def build_prompt(shots: list[tuple[str, str]], question: str) -> str:
    examples = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in shots)
    return examples + f"Question: {question}\nAnswer:"


def evaluate(backend: Backend, data: Path, options: TaskOptions) -> TaskResult:
    k = DEFAULT_FEWSHOT if options.num_fewshot is None else options.num_fewshot
    test = test_file(data)
    train = fewshot_split(test, ("train.jsonl", "train.json"), k, "a train split")
    shots = read_problems(train)[:k] if train else []
    if len(shots) < k:
        raise EvalDataError(f"--num-fewshot {k} but {train} has only {len(shots)} examples")
    problems = read_problems(test)[:options.limit]
    prompts = [build_prompt(shots, q) for q, _ in problems]
    params = GenerationParams(max_tokens=options.max_tokens, temperature=0.0, stop=STOP)
    outputs = backend.generate([[{"role": "user", "content": p}] if options.chat else p for p in prompts],
                               params)
    samples = []
    for (question, answer), out in zip(problems, outputs):
        strict, flexible = strict_match(out), flexible_extract(out)
        samples.append({"question": question, "answer": answer, "generation": out,
                        "strict": strict, "flexible": flexible,
                        "strict_match": exact_match(strict, answer),
                        "flexible_extract": exact_match(flexible, answer)})
    strict_scores = [s["strict_match"] for s in samples]
    flexible_scores = [s["flexible_extract"] for s in samples]
    n = len(samples)
    return TaskResult([
        Metric("gsm8k", "exact_match,strict-match", mean(strict_scores), mean_stderr(strict_scores), n),
        Metric("gsm8k", "exact_match,flexible-extract", mean(flexible_scores), mean_stderr(flexible_scores), n),
    ], samples)
