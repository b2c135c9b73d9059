"""The quickstart's instruction and preference sets built from the bundled Python docs."""

from __future__ import annotations

import json

from ember.data.preference import load_preference_pairs
from ember.data.pydoc_qa import pydoc_sections, write_pydoc_sets
from ember.data.sft import load_sft_examples
from tests.chat_tokenizers import chatml_tokenizer


def _read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sections_are_answers_about_their_titles() -> None:
    sections = pydoc_sections()
    assert len(sections) > 100 and len({s.title for s in sections}) == len(sections)
    by_title = {s.title: s.answer for s in sections}
    assert by_title['The "while" statement'].startswith('The "while" statement is used for repeated execution')
    assert all(40 <= len(s.answer) <= 400 and "\n" not in s.answer for s in sections)


def test_sets_split_by_section_and_load(tmp_path) -> None:
    paths = write_pydoc_sets(tmp_path, seed=0)
    sft_train, sft_val = _read(paths["sft_train"]), _read(paths["sft_val"])
    dpo_train, dpo_val = _read(paths["dpo_train"]), _read(paths["dpo_val"])
    train_answers = {r["messages"][1]["content"] for r in sft_train}
    val_answers = {r["messages"][1]["content"] for r in sft_val}
    assert train_answers and val_answers and not train_answers & val_answers  # held-out never trained on
    assert not {a for r in dpo_val for a in (r["chosen"], r["rejected"])} & train_answers
    assert all(r["chosen"] != r["rejected"] for r in dpo_train + dpo_val)
    tok = chatml_tokenizer()
    assert len(load_sft_examples(paths["sft_train"], tok, max_len=256)) == len(sft_train)
    assert len(load_preference_pairs(paths["dpo_val"], tok, max_len=256)) == len(dpo_val)
    again = write_pydoc_sets(tmp_path / "again", seed=0)
    assert again["dpo_train"].read_text() == paths["dpo_train"].read_text()  # deterministic
