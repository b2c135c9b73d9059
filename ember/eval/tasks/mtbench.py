"""MT-Bench-style multi-turn chat evaluation graded by an LLM judge (ember.eval.judge).

Data: MT-Bench's question.jsonl, {"question_id": 81, "category": "writing", "turns": [q1, q2],
"reference": [r1, r2] (optional)} per line. The model answers turn by turn through its chat
template (greedy), each turn seeing its own earlier answers. Then the judge (any
OpenAI-compatible endpoint, --judge-url) rates every turn 1-10:

    score, score_turn1, score_turn2, ...   mean rating over the judged turns (failures left out)
    judge_failures                         judge replies without a valid rating (a count)

With --baseline ANSWERS (FastChat's model_answer jsonl, or the results JSON of an earlier
`ember eval --task mtbench`), every turn is also judged pairwise against the baseline's answer
in both orders: win_rate, loss_rate, tie_rate over the judged pairs, and pairwise_failures.
The answers are kept in the results' samples, so that file can be the next run's baseline.
"""

from __future__ import annotations

import json
from pathlib import Path

from ember.eval.backend import Backend, GenerationParams
from ember.eval.datafile import EvalDataError, existing, read_records, require
from ember.eval.judge import Judge, JudgeCase, PairCase
from ember.eval.results import Metric, TaskResult
from ember.eval.stats import mean, mean_stderr
from ember.eval.tasks import TaskOptions


def read_questions(path: Path) -> list[dict]:
    path = existing(path, "MT-Bench questions")
    if path.is_dir():
        path = path / "question.jsonl"
        existing(path, "MT-Bench questions")
    questions = []
    for i, record in enumerate(read_records(path), 1):
        where = f"{path} record {i}"
        turns = require(record, "turns", list, where)
        if not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise EvalDataError(f"{where}: 'turns' must be a non-empty list of strings")
        ref = record.get("reference")
        if ref is not None and (not isinstance(ref, list) or not all(isinstance(r, str) for r in ref)):
            raise EvalDataError(f"{where}: 'reference' must be a list of strings, one per turn")
        questions.append({"question_id": record.get("question_id", i), "category": record.get("category", ""),
                          "turns": turns, "reference": ref})
    if not questions:
        raise EvalDataError(f"{path} holds no questions")
    return questions


def answer(backend: Backend, questions: list[dict], max_tokens: int) -> list[list[str]]:
    """Each question's answers, generated turn by turn (all questions batched per turn)."""
    answers: list[list[str]] = [[] for _ in questions]
    params = GenerationParams(max_tokens=max_tokens, temperature=0.0)
    for turn in range(max(len(q["turns"]) for q in questions)):
        todo = [i for i, q in enumerate(questions) if len(q["turns"]) > turn]
        chats = []
        for i in todo:
            msgs = []
            for t in range(turn + 1):
                msgs.append({"role": "user", "content": questions[i]["turns"][t]})
                if t < turn:
                    msgs.append({"role": "assistant", "content": answers[i][t]})
            chats.append(msgs)
        for i, text in zip(todo, backend.generate(chats, params)):
            answers[i].append(text.strip())
    return answers


def read_baseline(path: Path) -> dict[str, list[str]]:
    """question_id (as a string) -> answers, from FastChat jsonl or an ember results JSON."""
    path = existing(path, "baseline answers")
    if path.suffix == ".json":
        try:
            samples = json.loads(path.read_text(encoding="utf-8")).get("samples", [])
        except (json.JSONDecodeError, AttributeError):
            raise EvalDataError(f"{path}: not an ember results JSON (expected an object with 'samples')") from None
        return {str(s["question_id"]): s["answers"] for s in samples if "answers" in s}
    out = {}
    for i, record in enumerate(read_records(path), 1):
        choices = record.get("choices")
        if "question_id" not in record or not isinstance(choices, list) or not choices \
                or not isinstance(choices[0].get("turns"), list):
            raise EvalDataError(f"{path} record {i}: expected FastChat model_answer "
                                "{question_id, choices: [{turns: [...]}]}")
        out[str(record["question_id"])] = choices[0]["turns"]
    return out


def evaluate(backend: Backend, data: Path, options: TaskOptions) -> TaskResult:
    questions = read_questions(data)[:options.limit]
    if options.judge is None:
        raise EvalDataError("mtbench needs a judge: pass --judge-url URL (an OpenAI-compatible server)")
    baseline = read_baseline(options.baseline) if options.baseline else None
    answers = answer(backend, questions, options.max_tokens)
    judge = Judge(options.judge, options.judge_max_tokens)

    keys = [(qi, t) for qi, q in enumerate(questions) for t in range(len(q["turns"]))]
    ref = lambda qi, t: _reference(questions[qi], t)  # noqa: E731
    cases = [JudgeCase(tuple(questions[qi]["turns"]), tuple(answers[qi]), t, ref(qi, t)) for qi, t in keys]
    ratings, replies = judge.rate(cases)

    samples = [{**{k: q[k] for k in ("question_id", "category", "turns")}, "answers": answers[qi],
                "ratings": [], "judgments": []} for qi, q in enumerate(questions)]
    for (qi, _), rating, reply in zip(keys, ratings, replies):
        samples[qi]["ratings"].append(rating)
        samples[qi]["judgments"].append(reply)
    metrics = _score_rows(keys, ratings)

    if baseline is not None:
        missing = [str(q["question_id"]) for q in questions if str(q["question_id"]) not in baseline]
        if missing:
            raise EvalDataError(f"{options.baseline} has no answers for question_id {', '.join(missing[:5])}")
        pairs = [(qi, t) for qi, t in keys if t < len(baseline[str(questions[qi]["question_id"])])]
        pair_cases = [PairCase(tuple(questions[qi]["turns"]), tuple(answers[qi]),
                               tuple(baseline[str(questions[qi]["question_id"])]), t, ref(qi, t))
                      for qi, t in pairs]
        outcomes, pair_replies = judge.compare(pair_cases)
        for (qi, _), outcome, reply in zip(pairs, outcomes, pair_replies):
            samples[qi].setdefault("pairwise", []).append({"outcome": outcome, "judgments": list(reply)})
        metrics += _pair_rows(outcomes)
    return TaskResult(metrics, samples)


def _reference(question: dict, turn: int) -> str | None:
    refs = question["reference"] or []
    return refs[turn] if turn < len(refs) else None


def _score_rows(keys: list[tuple[int, int]], ratings: list[float | None]) -> list[Metric]:
    valid = [r for r in ratings if r is not None]
    rows = [Metric("mtbench", "score", mean(valid), mean_stderr(valid), len(valid))]
    for turn in range(max(t for _, t in keys) + 1):
        vals = [r for (_, t), r in zip(keys, ratings) if t == turn and r is not None]
        rows.append(Metric("mtbench", f"score_turn{turn + 1}", mean(vals), mean_stderr(vals), len(vals)))
    rows.append(Metric("mtbench", "judge_failures", float(len(ratings) - len(valid)), None, len(ratings)))
    return rows


def _pair_rows(outcomes: list[str | None]) -> list[Metric]:
    valid = [o for o in outcomes if o is not None]
    rows = []
    for name in ("win", "loss", "tie"):
        hits = [float(o == name) for o in valid]
        rows.append(Metric("mtbench", f"{name}_rate", mean(hits), mean_stderr(hits), len(hits)))
    rows.append(Metric("mtbench", "pairwise_failures", float(len(outcomes) - len(valid)), None, len(outcomes)))
    return rows
