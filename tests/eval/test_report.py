"""The quickstart's eval report: one table of every stage's perplexity plus the sample MMLU task."""

from __future__ import annotations

from ember.eval.report import lifecycle_report


def test_report_computes_the_base_perplexity_when_no_stage_recorded_one(tiny_dir) -> None:
    perplexity: dict[str, float] = {}
    table = lifecycle_report(perplexity, tiny_dir)
    assert list(perplexity) == [tiny_dir.name] and perplexity[tiny_dir.name] > 1
    assert "held-out perplexity" in table and "mmlu sample acc_norm" in table


def test_report_keeps_the_stages_entries_in_order(tiny_dir) -> None:
    perplexity = {"pretrain": 41.5, "finetune": 37.25, "quantize-nf4": 38.0}
    lines = lifecycle_report(perplexity, tiny_dir).splitlines()
    assert [ln.split()[0] for ln in lines[2:5]] == ["pretrain", "finetune", "quantize-nf4"]
    assert "37.2500" in lines[3] and len(perplexity) == 3
    assert lines[-1].split()[-1] == "12"  # the sample set's 12 questions
