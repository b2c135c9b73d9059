"""The MT-Bench judge: rating and verdict parsing, both-order pairwise, failures counted."""

from __future__ import annotations

import json

import pytest

from ember.eval.judge import combine_orders, parse_rating, parse_verdict
from ember.eval.tasks import TaskOptions, run_task
from tests.eval.scripted import ScriptedBackend


@pytest.mark.parametrize("reply, rating", [
    ("Clear and correct. Rating: [[7]]", 7.0),
    ("[[8.5]]", 8.5),
    ("Rating: [6]", 6.0),  # the single-bracket fallback
    ('Use the format "[[rating]]", e.g. [[5]]. My rating: [[9]]', 9.0),  # the verdict comes last
    ("I would rate this highly.", None),
    ("Rating: [[11]]", None),  # outside 1-10
    ("Rating: [[0]]", None),
    ("", None),
])
def test_parse_rating(reply: str, rating: float | None) -> None:
    assert parse_rating(reply) == rating


@pytest.mark.parametrize("reply, verdict", [
    ("A is more accurate. [[A]]", "A"), ("[[B]]", "B"), ("Both fine: [[C]]", "tie"),
    ("Either [[A]] or [[B]], hard to say", None), ("A is better", None), ("", None),
])
def test_parse_verdict(reply: str, verdict: str | None) -> None:
    assert parse_verdict(reply) == verdict


def test_pairwise_needs_both_orders_to_agree() -> None:
    # First verdict: model is A; second: model is B.
    assert combine_orders("A", "B") == "win"
    assert combine_orders("B", "A") == "loss"
    assert combine_orders("A", "A") == "tie"  # position bias: inconsistent -> tie
    assert combine_orders("tie", "tie") == "tie"
    assert combine_orders("A", None) is None and combine_orders(None, "B") is None


def _user_text(messages) -> str:
    return messages[-1]["content"]


def _judge(messages) -> str:
    """Rates by keyword; a 'MUMBLE' answer gets a reply without a rating. Pairwise: prefers GOOD,
    but answers [[A]] whatever the order for questions about 'bias' (a position-biased judge)."""
    text = _user_text(messages)
    if "decide which of two" in text:
        if "bias" in text:
            return "[[A]]"
        if "MUMBLE" in text:
            return "I cannot decide."
        if "[The Start of Assistant A's Answer]" in text:
            a_answer = text.split("[The Start of Assistant A's Answer]\n")[1].split("\n[The End")[0]
        else:  # later turn: A's last message in A's conversation
            a_conv = text.split("<|The Start of Assistant A's Conversation|>")[1].split("<|The End")[0]
            a_answer = a_conv.split("### Assistant A:\n")[-1]
        return "[[A]]" if "GOOD" in a_answer else "[[B]]"
    if "[The Start of Assistant's Answer]" in text:  # first turn
        graded = text.split("[The Start of Assistant's Answer]\n")[1].split("\n[The End")[0]
    else:  # later turn: the last assistant message of the conversation
        graded = text.split("### Assistant:\n")[-1].split("\n\n<|The End")[0]
    if "MUMBLE" in graded:
        return "Hard to say."
    return "Solid. Rating: [[8]]" if "GOOD" in graded else "Weak. Rating: [[4]]"


def test_mtbench_single_and_pairwise_by_hand(tmp_path) -> None:
    questions = [{"question_id": 1, "category": "coding", "turns": ["good one?", "follow up?"]},
                 {"question_id": 2, "category": "writing", "turns": ["bias test?"]},
                 {"question_id": 3, "category": "math", "turns": ["mumble?"], "reference": ["42"]}]
    (tmp_path / "question.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    answers = {"good one?": "GOOD answer", "follow up?": "plain answer", "bias test?": "GOOD too",
               "mumble?": "MUMBLE"}
    model = ScriptedBackend(reply=lambda msgs: answers[msgs[-1]["content"]])
    baseline = tmp_path / "baseline.jsonl"
    baseline.write_text("".join(json.dumps({"question_id": q, "choices": [{"index": 0, "turns": t}]}) + "\n"
                                for q, t in [(1, ["meh", "GOOD follow"]), (2, ["meh"]), (3, ["meh"])]))
    judge = ScriptedBackend(reply=_judge)
    result = run_task("mtbench", model, tmp_path, TaskOptions(judge=judge, baseline=baseline))

    # Turn 2 is answered with the whole conversation so far.
    assert model.prompts[-1] == [{"role": "user", "content": "good one?"},
                                 {"role": "assistant", "content": "GOOD answer"},
                                 {"role": "user", "content": "follow up?"}]
    # Ratings: q1 turn1 8, q1 turn2 4, q2 8, q3 malformed (a failure, not a crash).
    assert [s["ratings"] for s in result.samples] == [[8.0, 4.0], [8.0], [None]]
    assert result.value("score") == pytest.approx(20 / 3)
    assert result.value("score_turn1") == 8.0 and result.value("score_turn2") == 4.0
    assert result.value("judge_failures") == 1.0
    # The reference answer reaches the judge for q3.
    assert any("[The Start of Reference Answer]\n42" in _user_text(p) for p in judge.prompts)
    # Pairwise: q1t1 win (GOOD vs meh, both orders), q1t2 loss, q2 tie (always [[A]]), q3 failure.
    outcomes = [p["outcome"] for s in result.samples for p in s["pairwise"]]
    assert outcomes == ["win", "loss", "tie", None]
    assert result.value("win_rate") == pytest.approx(1 / 3)
    assert result.value("loss_rate") == pytest.approx(1 / 3)
    assert result.value("tie_rate") == pytest.approx(1 / 3)
    assert result.value("pairwise_failures") == 1.0


def test_mtbench_baseline_from_an_earlier_results_file(tmp_path) -> None:
    from ember.eval.results import write_results

    (tmp_path / "question.jsonl").write_text(json.dumps({"question_id": 7, "turns": ["x?"]}) + "\n")
    judge = ScriptedBackend(reply=_judge)
    first = run_task("mtbench", ScriptedBackend(reply=lambda m: "GOOD"), tmp_path, TaskOptions(judge=judge))
    write_results(tmp_path / "a.json", first, "model-a", {})
    second = run_task("mtbench", ScriptedBackend(reply=lambda m: "meh"), tmp_path,
                      TaskOptions(judge=judge, baseline=tmp_path / "a.json"))
    assert second.value("loss_rate") == 1.0 and second.value("pairwise_failures") == 0.0
