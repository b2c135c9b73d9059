"""MMLU-style multiple choice by log-likelihood, as lm-evaluation-harness's `mmlu` tasks.

Data: the original MMLU csv layout, no header, columns question, A, B, C, D, answer (a letter):

    data/test/<subject>_test.csv      the questions          (--data data, or one *_test.csv)
    data/dev/<subject>_dev.csv        few-shot examples, first k in file order (harness first_n)

Prompt (style "letters", the harness's `mmlu`), k-shot, continuation " A" / " B" / ...:

    The following are multiple choice questions (with answers) about <subject>.\\n\\n
    <dev question>\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer: C\\n\\n    (k times)
    <question>\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:

Style "continuation" (the harness's `mmlu_continuation`) scores the answer texts themselves
after "Question: <question>\\nAnswer:", where acc_norm (length-normalised) differs from acc;
with one-letter choices it cannot. Both metrics are averaged over all questions (the
harness's size-weighted group mean), with per-subject rows when there are several subjects.
"""

from __future__ import annotations

import csv
from pathlib import Path

from ember.eval.backend import Backend
from ember.eval.datafile import EvalDataError, existing, fewshot_split
from ember.eval.results import Metric, TaskResult
from ember.eval.stats import mean, mean_stderr
from ember.eval.tasks import TaskOptions
from ember.eval.tasks.multiple_choice import ChoiceItem, acc, acc_norm, choice_loglikelihoods

LETTERS = ("A", "B", "C", "D")
Row = tuple[str, tuple[str, str, str, str], int]  # question, choices, gold index


def read_csv(path: Path) -> list[Row]:
    rows = []
    with path.open(encoding="utf-8", newline="") as f:
        for lineno, cols in enumerate(csv.reader(f), 1):
            if not cols:
                continue
            if len(cols) != 6:
                raise EvalDataError(f"{path}:{lineno}: expected 6 columns (question, A, B, C, D, answer), "
                                    f"got {len(cols)}")
            answer = cols[5].strip().upper()
            if answer not in LETTERS:
                raise EvalDataError(f"{path}:{lineno}: answer must be one of A, B, C, D, got {cols[5]!r}")
            rows.append((cols[0], (cols[1], cols[2], cols[3], cols[4]), LETTERS.index(answer)))
    if not rows:
        raise EvalDataError(f"{path} holds no questions")
    return rows


def subject_files(data: Path) -> list[tuple[str, Path]]:
    """(subject, test csv) pairs: one *_test.csv file, or every one under a folder."""
    data = existing(data, "MMLU data")
    files = sorted(data.rglob("*_test.csv")) if data.is_dir() else [data]
    if not files:
        raise EvalDataError(f"no *_test.csv files under {data} (MMLU layout: test/<subject>_test.csv)")
    return [(f.name.removesuffix(".csv").removesuffix("_test"), f) for f in files]


def doc_text(question: str, choices: tuple[str, ...], style: str) -> str:
    if style == "continuation":
        return f"Question: {question.strip()}\nAnswer:"
    return question.strip() + "".join(f"\n{l}. {c}" for l, c in zip(LETTERS, choices)) + "\nAnswer:"


def targets(choices: tuple[str, ...], style: str) -> tuple[str, ...]:
    return choices if style == "continuation" else LETTERS


def build_context(subject: str, shots: list[Row], question: str, choices: tuple[str, ...], style: str) -> str:
    topic = subject.replace("_", " ")
    kind = "questions" if style == "continuation" else "multiple choice questions"
    header = f"The following are {kind} (with answers) about {topic}.\n\n"
    examples = "".join(f"{doc_text(q, c, style)} {targets(c, style)[g]}\n\n" for q, c, g in shots)
    return header + examples + doc_text(question, choices, style)


def evaluate(backend: Backend, data: Path, options: TaskOptions) -> TaskResult:
    style = options.mmlu_style
    if style not in ("letters", "continuation"):
        raise EvalDataError(f"mmlu style must be 'letters' or 'continuation', got {style!r}")
    k = 0 if options.num_fewshot is None else options.num_fewshot
    items: list[ChoiceItem] = []
    meta: list[tuple[str, Row]] = []
    for subject, test in subject_files(data):
        dev = fewshot_split(test, (f"{subject}_dev.csv",), k, f"a dev split for {subject}")
        shots = read_csv(dev)[:k] if dev else []
        if len(shots) < k:
            raise EvalDataError(f"--num-fewshot {k} but {dev} has only {len(shots)} examples")
        for row in read_csv(test)[:options.limit]:
            items.append(ChoiceItem(build_context(subject, shots, row[0], row[1], style),
                                    targets(row[1], style)))
            meta.append((subject, row))
    lls = choice_loglikelihoods(backend, items)
    samples, per_subject = [], {}
    for item, (subject, (question, _, gold)), ll in zip(items, meta, lls):
        a, an = acc(ll, gold), acc_norm(ll, item.choices, gold)
        samples.append({"subject": subject, "question": question, "gold": gold, "loglikelihoods": ll,
                        "acc": a, "acc_norm": an})
        per_subject.setdefault(subject, []).append((a, an))
    metrics = _rows("mmlu", [(s["acc"], s["acc_norm"]) for s in samples])
    if len(per_subject) > 1:
        for subject, scores in per_subject.items():
            metrics += _rows(f"mmlu_{subject}", scores)
    return TaskResult(metrics, samples)


def _rows(task: str, scores: list[tuple[float, float]]) -> list[Metric]:
    accs, norms = [a for a, _ in scores], [n for _, n in scores]
    return [Metric(task, "acc", mean(accs), mean_stderr(accs), len(accs)),
            Metric(task, "acc_norm", mean(norms), mean_stderr(norms), len(norms))]
