"""`ember eval` end to end: the same task through the in-process backend and through an
OpenAI-compatible server gives the same numbers; results JSON; one-line CLI errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ember.commands.eval import EvalConfig, main
from tests.eval.openai_fake import make_app, serve

# Both backends see 510-token windows: the server's 512 minus the echoed prompt's extra token
# and the one generated token.
TASKS = [
    ("perplexity", {}),
    ("mmlu", {"num_fewshot": 2}),
    ("mmlu", {"mmlu_style": "continuation"}),
    ("truthfulqa", {"limit": 6}),
    ("gsm8k", {"num_fewshot": 1, "limit": 3, "max_tokens": 24}),
]


def _values(result) -> dict[str, float]:
    return {f"{m.task}/{m.metric}": m.value for m in result.metrics}


@pytest.mark.parametrize("task, extra", TASKS, ids=[f"{t}-{i}" for i, (t, _) in enumerate(TASKS)])
def test_in_process_and_http_give_the_same_numbers(task, extra, tiny_dir, server_url, tmp_path, capsys) -> None:
    local = main(EvalConfig(task=task, model=tiny_dir, max_len=510, out=tmp_path / "local.json", **extra))
    remote = main(EvalConfig(task=task, base_url=server_url, tokenizer=tiny_dir, out=tmp_path / "remote.json",
                             **extra))
    a, b = _values(local), _values(remote)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    if task == "gsm8k":
        assert [s["generation"] for s in local.samples] == [s["generation"] for s in remote.samples]
    # The printed table and the results file.
    out = capsys.readouterr().out
    assert f"{task} on" in out and "± stderr" in out
    rows = json.loads((tmp_path / "remote.json").read_text())["results"]
    assert {r["metric"] for r in rows} == {m.metric for m in remote.metrics}
    for row in rows:
        assert set(row) == {"task", "metric", "value", "stderr", "n", "model", "config", "date"}
        assert row["model"].startswith("fake-model @ http://127.0.0.1:") and row["config"]["task"] == task


def _judge(messages) -> str:
    text = messages[-1]["content"]
    if "decide which of two" in text:
        return "[[A]]"  # a position-biased judge: the two orders disagree, so every pair is a tie
    if "[The Start of Assistant's Answer]" not in text:
        return "no verdict"  # second turns: a malformed judge reply, counted as a failure
    answer = text.split("[The Start of Assistant's Answer]\n")[1].split("\n[The End")[0]
    return f"Rating: [[{1 + len(answer) % 10}]]"


def test_mtbench_through_both_backends_and_a_judge_server(tiny_dir, server_url, tmp_path) -> None:
    with serve(make_app(reply=_judge)) as judge_url:
        common = dict(task="mtbench", limit=3, max_tokens=12, judge_url=judge_url, judge_model="judge")
        local = main(EvalConfig(model=tiny_dir, max_len=510, out=tmp_path / "a.json", **common))
        remote = main(EvalConfig(base_url=server_url, baseline=tmp_path / "a.json", **common))
    assert [s["answers"] for s in local.samples] == [s["answers"] for s in remote.samples]
    assert _values(remote)["mtbench/score"] == _values(local)["mtbench/score"]
    assert _values(local)["mtbench/judge_failures"] == 3.0  # the three second turns
    assert _values(remote)["mtbench/tie_rate"] == 1.0 and _values(remote)["mtbench/pairwise_failures"] == 0.0
    assert len({s["ratings"][0] for s in local.samples}) > 1  # ratings follow the answers


@pytest.mark.parametrize("args, needle", [
    (["--task", "mmlu"], "exactly one of --model DIR"),
    (["--task", "mmlu", "--model", "/no/such/model"], "does not exist"),
])
def test_cli_errors_are_one_line(args, needle, tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "ember", "eval", *args], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
