"""Task metrics against hand-computed expectations, with a scripted backend.

acc / acc_norm (MMLU), MC1 / MC2 (TruthfulQA), strict / flexible extraction (GSM8K) and the
perplexity metrics each get small fixtures whose right answer is worked out in the comments;
prompt formats are checked string for string against lm-evaluation-harness's templates.
"""

from __future__ import annotations

import json
import math

import pytest

from ember.errors import EmberError
from ember.data.sources import DataSourceError
from ember.eval.datafile import sample_data
from ember.eval.tasks import TaskOptions, run_task
from ember.eval.tasks.gsm8k import exact_match, flexible_extract, strict_match
from tests.eval.scripted import ScriptedBackend


def _csv(path, rows) -> None:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)


def test_mmlu_acc_and_acc_norm_by_hand(tmp_path) -> None:
    # Choices of 2, 6, 4 and 1 characters with log-likelihoods -4, -6, -5, -3.5:
    #   acc picks the largest ll        -> index 3 ("a")
    #   acc_norm picks the largest ll/len: -2, -1, -1.25, -3.5 -> index 1 ("abcdef")
    _csv(tmp_path / "test" / "toy_test.csv", [["Q1?", "ab", "abcdef", "abcd", "a", "B"],
                                              ["Q2?", "ab", "abcdef", "abcd", "a", "D"]])
    backend = ScriptedBackend(lls={" ab": -4.0, " abcdef": -6.0, " abcd": -5.0, " a": -3.5})
    result = run_task("mmlu", backend, tmp_path, TaskOptions(mmlu_style="continuation"))
    # Q1 (gold B): acc 0, acc_norm 1.  Q2 (gold D): acc 1, acc_norm 0.
    assert [(s["acc"], s["acc_norm"]) for s in result.samples] == [(0.0, 1.0), (1.0, 0.0)]
    assert result.value("acc") == 0.5 and result.value("acc_norm") == 0.5
    assert result.metrics[0].stderr == pytest.approx(0.5)  # std([0, 1], ddof=1) / sqrt(2)
    assert backend.requests[0] == ("The following are questions (with answers) about toy.\n\nQuestion: Q1?\nAnswer:",
                                   " ab")


def test_mmlu_letters_prompt_is_the_harness_template(tmp_path) -> None:
    _csv(tmp_path / "dev" / "college_python_dev.csv", [["Shot one?", "w", "x", "y", "z", "C"],
                                                       ["Shot two?", "w", "x", "y", "z", "A"]])
    _csv(tmp_path / "test" / "college_python_test.csv", [[" Real question? ", "1", "2", "3", "4", "B"]])
    backend = ScriptedBackend(lls={" A": -3.0, " B": -1.0, " C": -2.0, " D": -4.0})
    result = run_task("mmlu", backend, tmp_path / "test" / "college_python_test.csv", TaskOptions(num_fewshot=1))
    expected = ("The following are multiple choice questions (with answers) about college python.\n\n"
                "Shot one?\nA. w\nB. x\nC. y\nD. z\nAnswer: C\n\n"
                "Real question?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:")
    assert backend.requests == [(expected, f" {c}") for c in "ABCD"]
    assert result.value("acc") == 1.0 and result.value("acc_norm") == 1.0  # one-letter choices: same ranking


def test_truthfulqa_mc1_mc2_by_hand(tmp_path) -> None:
    records = [
        # MC1: the true answer (-1) loses to a false one (-0.5) -> 0.
        # MC2: p = 0.2, 0.3 (true) and 0.5 (false) -> 0.5 / 1.0 = 0.5.
        {"question": "q1", "mc1_targets": {"t1": 1, "f1": 0, "f2": 0},
         "mc2_targets": {"T1": 1, "T2": 1, "F1": 0}},
        # HF layout. MC1: true -0.1 beats -0.5, -2 -> 1.  MC2: unnormalised p 2, 4 vs 4 -> 6 / 10.
        {"question": "q2", "mc1_targets": {"choices": ["f2", "t2", "f1"], "labels": [0, 1, 0]},
         "mc2_targets": {"choices": ["F2", "U1", "U2"], "labels": [0, 1, 1]}},
    ]
    path = tmp_path / "mc.json"
    path.write_text(json.dumps(records))
    lls = {" t1": -1.0, " f1": -0.5, " f2": -2.0, " t2": -0.1, " T1": math.log(0.2), " T2": math.log(0.3),
           " F1": math.log(0.5), " U1": math.log(2), " U2": math.log(4), " F2": math.log(4)}
    # q2's mc1 has f1 = -0.5 as well, below t2 = -0.1.
    backend = ScriptedBackend(lls=lls)
    result = run_task("truthfulqa", backend, path, TaskOptions())
    assert [s["mc1"] for s in result.samples] == [0.0, 1.0]
    assert [s["mc2"] for s in result.samples] == pytest.approx([0.5, 0.6])
    assert result.value("mc1") == 0.5 and result.value("mc2") == pytest.approx(0.55)
    context = backend.requests[0][0]
    assert context.startswith("Q: What is human life expectancy in the United States?\n")
    assert context.endswith("A: The 1992 Olympics were held in Barcelona, Spain.\n\nQ: q1\nA:")


@pytest.mark.parametrize("text, strict, flexible", [
    ("2 + 3 = 5 apples.\n#### 1,234.", "1,234.", "1,234."),
    ("The answer is $42. Then 7 more", "[invalid]", "7"),  # flexible takes the LAST number
    ("#### -3 and later 9", "-3", "9"),
    ("no digits here", "[invalid]", "[invalid]"),
])
def test_gsm8k_extraction_regexes(text, strict, flexible) -> None:
    assert strict_match(text) == strict
    assert flexible_extract(text) == flexible


def test_gsm8k_exact_match_normalisation() -> None:
    ref = "Work it out.\n#### 1234"
    assert exact_match("1,234.", ref) == 1.0  # "," and a final "." are ignored, as is "... #### "
    assert exact_match("$1234", ref) == 1.0
    assert exact_match("1234.5", ref) == 0.0
    assert exact_match("[invalid]", ref) == 0.0


def test_gsm8k_task_by_hand(tmp_path) -> None:
    (tmp_path / "train.jsonl").write_text(json.dumps({"question": "Shot?", "answer": "1 + 1 = 2\n#### 2"}) + "\n")
    problems = [("Q1?", "#### 5", "2 + 3 = 5 apples.\n#### 5"),   # strict 1, flexible 1
                ("Q2?", "#### 12", "So the total is 12 dollars"),  # strict 0 ([invalid]), flexible 1
                ("Q3?", "#### 7", "#### 7 then 9")]                # strict 1, flexible 0 (last is 9)
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"question": q, "answer": a}) + "\n"
                                                 for q, a, _ in problems))
    replies = {f"Question: Shot?\nAnswer: 1 + 1 = 2\n#### 2\n\nQuestion: {q}\nAnswer:": g for q, _, g in problems}
    backend = ScriptedBackend(reply=lambda p: replies[p])
    result = run_task("gsm8k", backend, tmp_path, TaskOptions(num_fewshot=1, max_tokens=64))
    assert [s["strict_match"] for s in result.samples] == [1.0, 0.0, 1.0]
    assert [s["flexible_extract"] for s in result.samples] == [1.0, 1.0, 0.0]
    assert result.value("exact_match,strict-match") == pytest.approx(2 / 3)
    assert backend.params[0].stop == ("Question:", "</s>", "<|im_end|>") and backend.params[0].temperature == 0
    # --chat sends the same prompt as one user message.
    chat = ScriptedBackend(reply=lambda p: replies[p[0]["content"]])
    run_task("gsm8k", chat, tmp_path, TaskOptions(num_fewshot=1, chat=True))
    assert chat.prompts[0] == [{"role": "user", "content": next(iter(replies))}]


def test_perplexity_metrics_by_hand(tmp_path) -> None:
    # Two documents of 11 and 2 UTF-8 bytes (2 and 1 words, 4 and 1 tokens) costing 22 and 2 bits.
    texts = ["hello world", "é"]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    ln2 = math.log(2)
    backend = ScriptedBackend(rolling={"hello world": (-22 * ln2, 4), "é": (-2 * ln2, 1)})
    result = run_task("perplexity", backend, path, TaskOptions())
    assert result.value("bits_per_byte") == pytest.approx(24 / 13)
    assert result.value("byte_perplexity") == pytest.approx(2 ** (24 / 13))
    assert result.value("word_perplexity") == pytest.approx(2 ** 8)  # 24 bits over 3 words
    assert result.value("token_perplexity") == pytest.approx(2 ** (24 / 5))
    assert all(m.n == 2 and m.stderr is not None and m.stderr > 0 for m in result.metrics)


def test_sample_sets_parse_in_their_public_formats() -> None:
    from ember.eval.tasks.gsm8k import read_problems
    from ember.eval.tasks.mmlu import read_csv
    from ember.eval.tasks.mtbench import read_questions

    assert len(read_csv(sample_data("mmlu/test/python_programming_test.csv"))) == 12
    assert len(read_csv(sample_data("mmlu/dev/python_programming_dev.csv"))) == 5
    assert len(read_problems(sample_data("gsm8k/test.jsonl"))) == 12
    assert len(read_questions(sample_data("mtbench/question.jsonl"))) == 12
    backend = ScriptedBackend(lls=_AnyLL())
    assert run_task("truthfulqa", backend, sample_data("truthfulqa"), TaskOptions()).metrics[0].n == 12


class _AnyLL(dict):
    def __missing__(self, key: str) -> float:
        return -float(len(key))


@pytest.mark.parametrize("task, files, options, needle", [
    ("mmlu", {"test/x_test.csv": "q,a,b,c,d\n"}, TaskOptions(), "expected 6 columns"),
    ("mmlu", {"test/x_test.csv": "q,a,b,c,d,E\n"}, TaskOptions(), "answer must be one of"),
    ("mmlu", {"test/x_test.csv": "q,a,b,c,d,A\n"}, TaskOptions(num_fewshot=2), "needs a dev split for x"),
    ("mmlu", {"notes.txt": "hi"}, TaskOptions(), "no *_test.csv"),
    ("gsm8k", {"test.jsonl": '{"question": "q", "answer": "42"}\n'}, TaskOptions(num_fewshot=0), "#### <number>"),
    ("gsm8k", {"test.jsonl": '{"question": "q", "answer": "#### 1"}\n'}, TaskOptions(), "train split"),
    ("truthfulqa", {"mc.jsonl": '{"question": "q", "mc1_targets": {"a": 1}, "mc2_targets": {"a": 1}}\n'},
     TaskOptions(), "at least one true (1) and one false"),
    ("truthfulqa", {"mc.jsonl": "{not json\n"}, TaskOptions(), "mc.jsonl:1: not valid JSON"),
    ("mtbench", {"question.jsonl": '{"question_id": 1, "turns": []}\n'}, TaskOptions(judge=ScriptedBackend()),
     "non-empty list"),
    ("mtbench", {"question.jsonl": '{"question_id": 1, "turns": ["hi"]}\n'}, TaskOptions(), "--judge-url"),
])
def test_bad_data_is_one_clear_error(tmp_path, task, files, options, needle) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    with pytest.raises(DataSourceError) as err:  # EvalDataError, or the jsonl reader's own
        run_task(task, ScriptedBackend(lls=_AnyLL(), reply=lambda p: ""), tmp_path, options)
    assert needle in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(EmberError, match="does not exist"):
        run_task(task, ScriptedBackend(), tmp_path / "missing", options)
