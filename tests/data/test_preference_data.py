"""Preference data: prompt/chosen/rejected records, response-only labels, errors with file and line."""

from __future__ import annotations

import json

import pytest

from ember.data.conversations import ChatDataError
from ember.data.preference import PreferenceBatches, load_preference_pairs
from ember.data.sft import IGNORE_INDEX
from tests.chat_tokenizers import chatml_tokenizer


def _write(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_pairs_label_only_the_answers(tmp_path) -> None:
    tok = chatml_tokenizer()
    path = tmp_path / "prefs.jsonl"
    _write(path, [
        {"prompt": "What is a tuple?", "chosen": "An immutable sequence.", "rejected": "A loop."},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "A tuple?"}],
         "chosen": [{"role": "assistant", "content": "Immutable."}],
         "rejected": [{"role": "assistant", "content": "Mutable."}]},
    ])
    pairs = load_preference_pairs(path, tok, max_len=128)
    for pair, chosen, rejected in zip(pairs, ["An immutable sequence.", "Immutable."], ["A loop.", "Mutable."]):
        for ex, answer in ((pair.chosen, chosen), (pair.rejected, rejected)):
            labelled = [t for t, label in zip(ex.input_ids, ex.labels) if label != IGNORE_INDEX]
            assert tok.decode(labelled) == answer + "<|im_end|>"  # the earlier "Hello." is prompt, not response
    batch = PreferenceBatches(pairs, micro_batch=2, pad_id=tok.pad_token_id, seed=0).next_batch()
    assert batch["input_ids"].shape[0] == 4
    # Rows i and i + B are the two answers to the same prompt.
    for i in range(2):
        c, r = batch["input_ids"][i].tolist(), batch["input_ids"][i + 2].tolist()
        assert c[:5] == r[:5]


@pytest.mark.parametrize("record, needle", [
    ({"prompt": "hi", "chosen": "yo"}, r"p\.jsonl:1: preference records need .* missing rejected"),
    ({"prompt": "hi", "chosen": "yo", "rejected": [{"role": "user", "content": "x"}]},
     r"p\.jsonl:1: 'rejected' must end with an assistant message"),
    ({"prompt": "hi", "chosen": "", "rejected": "no"}, r"p\.jsonl has no usable preference pair"),
])
def test_bad_preference_records(tmp_path, record, needle) -> None:
    path = tmp_path / "p.jsonl"
    _write(path, [record])
    with pytest.raises(ChatDataError, match=needle):
        load_preference_pairs(path, chatml_tokenizer(), max_len=64)
