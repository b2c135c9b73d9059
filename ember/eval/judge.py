"""LLM-as-a-judge in the MT-Bench manner: single-answer ratings and pairwise verdicts.

    judge = Judge(OpenAIBackend("http://judge:8000"))
    ratings = judge.rate([JudgeCase(turns, answers, turn=1)])          # [7.0, None, ...]
    outcomes = judge.compare([PairCase(turns, model_answers, baseline_answers, turn=0)])

Single grading asks for a 1-10 rating written "[[rating]]" and reads it back (the last
"[[n]]", else the last "[n]"). Pairwise grading asks for "[[A]]", "[[B]]" or "[[C]]" (tie) and
is asked twice with the answers swapped: a side wins only when both orders pick it, any
disagreement is a tie (position bias cancels). A reply without a valid rating or verdict
(missing, out of range, or naming two different verdicts) is a failure, returned as None and
counted by the caller, never an exception. On a second turn the judge sees the whole
conversation and grades the answer to the last question; a reference answer, when the
question has one (maths, reasoning, coding), is shown to the judge.

The prompt wording is ember's own; its structure and output formats follow MT-Bench
(Zheng et al., 2023) so any judge that knows that format works.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from ember.eval.backend import Backend, GenerationParams

_RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_RATING_LOOSE = re.compile(r"\[(\d+\.?\d*)\]")
_VERDICTS = {"[[A]]": "A", "[[B]]": "B", "[[C]]": "tie"}

SYSTEM = "You are a fair, careful judge of answers written by AI assistants."
_CRITERIA = ("Weigh helpfulness, relevance, accuracy, depth, creativity and level of detail. "
             "Start with a short, objective explanation.")


@dataclass(frozen=True)
class JudgeCase:
    """Grade answers[turn] of a conversation whose user questions are `questions`."""

    questions: tuple[str, ...]
    answers: tuple[str, ...]
    turn: int
    reference: str | None = None


@dataclass(frozen=True)
class PairCase:
    questions: tuple[str, ...]
    answers_a: tuple[str, ...]
    answers_b: tuple[str, ...]
    turn: int
    reference: str | None = None


def parse_rating(reply: str) -> float | None:
    """The 1-10 rating in a judge reply, or None when it has none (a failure)."""
    found = _RATING.findall(reply) or _RATING_LOOSE.findall(reply)
    if not found:
        return None
    rating = float(found[-1])  # the format example may be quoted first; the verdict comes last
    return rating if 1 <= rating <= 10 else None


def parse_verdict(reply: str) -> str | None:
    """'A', 'B' or 'tie' from a pairwise reply; None when absent or contradictory."""
    found = {v for tag, v in _VERDICTS.items() if tag in reply}
    return found.pop() if len(found) == 1 else None


def combine_orders(first: str | None, swapped: str | None) -> str | None:
    """Outcome for the model given the verdicts with it as A, then as B: win, loss, tie or None."""
    if first is None or swapped is None:
        return None
    a = {"A": "win", "B": "loss", "tie": "tie"}[first]
    b = {"B": "win", "A": "loss", "tie": "tie"}[swapped]
    return a if a == b else "tie"


def _conversation(questions: Sequence[str], answers: Sequence[str], turn: int, label: str) -> str:
    parts = [f"### User:\n{q}\n\n### {label}:\n{a}" for q, a in zip(questions[:turn + 1], answers[:turn + 1])]
    return f"<|The Start of {label}'s Conversation|>\n\n" + "\n\n".join(parts) + \
        f"\n\n<|The End of {label}'s Conversation|>"


def _reference(ref: str | None) -> str:
    return "" if ref is None else f"[The Start of Reference Answer]\n{ref}\n[The End of Reference Answer]\n\n"


def single_messages(case: JudgeCase) -> list[dict[str, str]]:
    target = "the assistant's answer" if case.turn == 0 else "the assistant's answer to the user's last question"
    ref_note = " Compare it with the reference answer and count mistakes against it." if case.reference else ""
    task = (f"[Instruction]\nAct as an impartial judge and assess the quality of {target} below. "
            f"{_CRITERIA}{ref_note} Then rate the answer from 1 to 10, written exactly as \"[[rating]]\", "
            "for example \"Rating: [[5]]\".\n\n")
    if case.turn == 0:
        body = (f"[Question]\n{case.questions[0]}\n\n{_reference(case.reference)}"
                f"[The Start of Assistant's Answer]\n{case.answers[0]}\n[The End of Assistant's Answer]")
    else:
        body = _reference(case.reference) + _conversation(case.questions, case.answers, case.turn, "Assistant")
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": task + body}]


def pair_messages(case: PairCase) -> list[dict[str, str]]:
    target = "the user's question" if case.turn == 0 else "the user's last question"
    ref_note = " Use the reference answer to check correctness." if case.reference else ""
    task = (f"[Instruction]\nAct as an impartial judge and decide which of two AI assistants answered "
            f"{target} better. {_CRITERIA}{ref_note} The order of the answers, their length and the "
            "assistants' names must not sway you. End with your verdict written exactly as \"[[A]]\" if "
            "assistant A is better, \"[[B]]\" if assistant B is better, or \"[[C]]\" for a tie.\n\n")
    if case.turn == 0:
        body = (f"[User Question]\n{case.questions[0]}\n\n{_reference(case.reference)}"
                f"[The Start of Assistant A's Answer]\n{case.answers_a[0]}\n[The End of Assistant A's Answer]\n\n"
                f"[The Start of Assistant B's Answer]\n{case.answers_b[0]}\n[The End of Assistant B's Answer]")
    else:
        body = (_reference(case.reference)
                + _conversation(case.questions, case.answers_a, case.turn, "Assistant A") + "\n\n"
                + _conversation(case.questions, case.answers_b, case.turn, "Assistant B"))
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": task + body}]


class Judge:
    """Grades with a judge model behind any Backend (usually an OpenAI-compatible server)."""

    def __init__(self, backend: Backend, max_tokens: int = 2048) -> None:
        self.backend = backend
        self.params = GenerationParams(max_tokens=max_tokens, temperature=0.0)

    def rate(self, cases: Sequence[JudgeCase]) -> tuple[list[float | None], list[str]]:
        """(rating or None per case, the judge's replies)."""
        replies = self.backend.generate([single_messages(c) for c in cases], self.params)
        return [parse_rating(r) for r in replies], replies

    def compare(self, cases: Sequence[PairCase]) -> tuple[list[str | None], list[tuple[str, str]]]:
        """('win' / 'loss' / 'tie' for answers_a, or None per case; the two replies of each case)."""
        swapped = [PairCase(c.questions, c.answers_b, c.answers_a, c.turn, c.reference) for c in cases]
        replies = self.backend.generate([pair_messages(c) for c in [*cases, *swapped]], self.params)
        first, second = replies[:len(cases)], replies[len(cases):]
        outcomes = [combine_orders(parse_verdict(a), parse_verdict(b)) for a, b in zip(first, second)]
        return outcomes, list(zip(first, second))
