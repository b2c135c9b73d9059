"""The quickstart's eval report: every model on one held-out set and window, plus the sample MMLU task."""

from __future__ import annotations

from ember.eval.perplexity import PerplexityResult
from ember.eval.report import HeldOut, HeldOutRow, lifecycle_report


def _heldout() -> HeldOut:
    return HeldOut.bundled(max_doc_bytes=600, window=64)


def test_heldout_set_is_pretrainings_held_out_split_cut_per_document() -> None:
    from ember.data.shards import VAL_FRACTION, holdout_key
    from ember.data.sources import bundled_documents

    heldout = _heldout()
    held = [d.text for d in bundled_documents() if holdout_key(d.text) < VAL_FRACTION]
    assert len(heldout.texts) == len(held) >= 2
    assert all(h.startswith(t) and 0 < len(t.encode()) <= 600 for t, h in zip(heldout.texts, held))


def test_report_measures_the_models_no_stage_measured(tiny_dir) -> None:
    rows: dict[str, HeldOutRow] = {}
    table = lifecycle_report(rows, _heldout(), {"tiny": tiny_dir})
    assert list(rows) == ["tiny"] and rows["tiny"].result.bits_per_byte > 0
    assert "bits/byte" in table and "mmlu acc_norm" in table
    assert "12 questions" in table  # the sample set's 12 questions


def test_report_keeps_the_stages_rows_in_order_and_labels_mixed_tokenizers(tiny_dir) -> None:
    def row(tok: str, ll: float) -> HeldOutRow:
        return HeldOutRow(tok, PerplexityResult(loglikelihood=ll, tokens=100, words=40, bytes=300, documents=1))

    rows = {"pretrain": row("toy 512", -300.0), "finetune": row("toy 512", -250.0), "real": row("real 49152", -150.0)}
    lines = lifecycle_report(rows, _heldout(), {"finetune": tiny_dir}).splitlines()
    assert [ln.split()[0] for ln in lines[2:5]] == ["pretrain", "finetune", "real"]
    assert f"{250 / 300 / 0.6931471805599453:.4f}" in lines[3]  # bits per byte = -LL / bytes / ln 2
    assert "±" in lines[3] and "±" not in lines[2]  # MMLU only for the models asked
    assert any("token ppl only rows of one tokenizer" in ln for ln in lines)
