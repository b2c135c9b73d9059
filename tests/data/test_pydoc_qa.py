"""The quickstart's instruction and preference sets built from the bundled Python docs."""

from __future__ import annotations

import json

from ember.data.preference import load_preference_pairs
from collections import Counter

from ember.data.pydoc_qa import preference_records, pydoc_sections, write_pydoc_sets
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
    title = lambda answer: answer.split(":")[0]  # noqa: E731
    train_titles = {title(a) for a in train_answers}
    assert not {title(a) for r in dpo_val for a in (r["chosen"], r["rejected"])} & train_titles
    assert {title(a) for r in dpo_train for a in (r["chosen"], r["rejected"])} == train_titles
    assert all(r["chosen"] != r["rejected"] for r in dpo_train + dpo_val)
    assert len(dpo_val) > 4 * len(sft_val)  # several pairs per held-out section: a finer accuracy
    tok = chatml_tokenizer()
    assert len(load_sft_examples(paths["sft_train"], tok, max_len=256)) == len(sft_train)
    assert len(load_preference_pairs(paths["dpo_val"], tok, max_len=256)) == len(dpo_val)
    again = write_pydoc_sets(tmp_path / "again", seed=0)
    assert again["dpo_train"].read_text() == paths["dpo_train"].read_text()  # deterministic


def test_preference_pairs_are_balanced_brief_answers_to_their_question() -> None:
    sections = pydoc_sections()[:30]
    records = preference_records(sections, seed=3, per_section=4)
    assert len(records) == 120 and len({(r["prompt"], r["rejected"]) for r in records}) == 120
    chosen, rejected = Counter(r["chosen"] for r in records), Counter(r["rejected"] for r in records)
    assert chosen == rejected and set(chosen.values()) == {4}  # no answer is good or bad on its own
    for r in records:
        assert r["chosen"].split(":")[0] in r["prompt"] and r["rejected"].split(":")[0] not in r["prompt"]
    by_title = {s.title: s for s in sections}
    reply = records[0]["chosen"]
    assert by_title[reply.split(":")[0]].reply.startswith(reply)  # the title and the first sentence
    assert len(preference_records(sections[:3], seed=0, per_section=5)) == 6  # at most every other section
