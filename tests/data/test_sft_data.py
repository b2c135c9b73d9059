"""SFT data: the three record formats, assistant-only labels under two chat templates, packing, errors."""

from __future__ import annotations

import json

import pytest
import torch

from ember.data.conversations import ChatDataError, read_conversations
from ember.data.sources import DataSourceError
from ember.data.sft import (IGNORE_INDEX, SFTBatches, assistant_spans, collate, load_sft_examples,
                            tokenize_chat)
from tests.chat_tokenizers import chatml_tokenizer, llama3_tokenizer

CHAT = [{"role": "system", "content": "You answer questions about Python."},
        {"role": "user", "content": "What is a tuple?"},
        {"role": "assistant", "content": "An immutable sequence: Grüße, 東京 🙂."},
        {"role": "user", "content": "And a list?"},
        {"role": "assistant", "content": "A mutable sequence."}]


def _labelled_runs(example) -> list[list[int]]:
    """Maximal runs of consecutive labelled token ids."""
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    return runs + ([current] if current else [])


@pytest.mark.parametrize("make_tok, end", [(chatml_tokenizer, "<|im_end|>"), (llama3_tokenizer, "<|eot_id|>")])
def test_labels_cover_exactly_the_assistant_answers(make_tok, end) -> None:
    tok = make_tok()
    example = tokenize_chat(tok, CHAT)
    # The ids are exactly what the chat template gives at inference time.
    assert example.input_ids == tok.apply_chat_template(CHAT, add_generation_prompt=False, tokenize=True)
    runs = [tok.decode(run) for run in _labelled_runs(example)]
    assert runs == ["An immutable sequence: Grüße, 東京 🙂." + end, "A mutable sequence." + end]
    # Only the last answer (DPO's response) when asked.
    last = tokenize_chat(tok, CHAT, first=4)
    assert [tok.decode(r) for r in _labelled_runs(last)] == ["A mutable sequence." + end]


def test_prefix_rendering_matches_the_generation_prompt() -> None:
    tok = chatml_tokenizer()
    text, spans = assistant_spans(tok, CHAT[:3])
    prompt = tok.apply_chat_template(CHAT[:2], add_generation_prompt=True)
    assert text.startswith(prompt) and spans == [(len(prompt), len(text.rstrip()))]


def test_three_formats_give_the_same_example(tmp_path) -> None:
    path = tmp_path / "mixed.jsonl"
    records = [
        {"instruction": "Name a loop.", "input": "Python", "output": "for"},
        {"messages": [{"role": "user", "content": "Name a loop.\n\nPython"}, {"role": "assistant", "content": "for"}]},
        {"conversations": [{"from": "human", "value": "Name a loop.\n\nPython"}, {"from": "gpt", "value": "for"}]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    conversations = [m for _, m in read_conversations(path)]
    assert conversations[0] == conversations[1] == conversations[2]
    examples = load_sft_examples(path, chatml_tokenizer(), max_len=64)
    assert len(examples) == 3 and examples[0] == examples[1] == examples[2]


@pytest.mark.parametrize("lines, needle", [
    (['{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}', '{"messages": ['],
     r"bad\.jsonl:2: not valid JSON"),
    (['{"prompt": "hi", "completion": "yo"}'], r"bad\.jsonl:1: unknown record .*Alpaca"),
    (['{"messages": [{"role": "User", "content": "hi"}]}'], r"bad\.jsonl:1: messages\[0\] has role 'User'"),
    (['{"conversations": [{"from": "bot", "value": "hi"}]}'], r"bad\.jsonl:1: conversations\[0\] is from 'bot'"),
    (['{"instruction": "hi", "output": 3}'], r"bad\.jsonl:1: Alpaca field 'output' must be a string"),
    (['[1, 2]'], r"bad\.jsonl:1: expected a JSON object"),
    ([], r"bad\.jsonl has no usable example"),
    (['{"instruction": "hi", "output": ""}'], r"bad\.jsonl has no usable example"),
])
def test_bad_files_name_file_and_line(tmp_path, lines, needle) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataSourceError, match=needle):
        load_sft_examples(path, chatml_tokenizer(), max_len=64)


def test_missing_file_and_template_errors(tmp_path) -> None:
    with pytest.raises(ChatDataError, match="does not exist"):
        load_sft_examples(tmp_path / "none.jsonl", chatml_tokenizer(), max_len=64)
    path = tmp_path / "tool.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}) + "\n")
    with pytest.raises(ChatDataError, match="no usable example"):  # an answer to nothing is not trained on
        load_sft_examples(path, chatml_tokenizer(), max_len=64)


def test_truncation_skips_examples_without_answer_tokens(tmp_path, caplog) -> None:
    path = tmp_path / "long.jsonl"
    long_prompt = {"instruction": "word " * 200, "output": "done"}
    path.write_text(json.dumps(long_prompt) + "\n" + json.dumps({"instruction": "hi", "output": "yo"}) + "\n")
    examples = load_sft_examples(path, chatml_tokenizer(), max_len=32)
    assert len(examples) == 1 and "skipped 1 example" in caplog.text


def _examples(n: int = 12):
    tok = chatml_tokenizer()
    convs = [[{"role": "user", "content": f"Question {i}: " + "why " * (i % 5)},
              {"role": "assistant", "content": "Because " * (1 + i % 3)}] for i in range(n)]
    return [tokenize_chat(tok, c) for c in convs], tok


def test_packing_fills_rows_and_restarts_positions() -> None:
    examples, tok = _examples()
    seq_len = 128  # examples are 28-47 tokens: two or three per row
    batches = SFTBatches(examples, micro_batch=2, pad_id=tok.pad_token_id, pack=True, seq_len=seq_len, seed=1)
    batch = batches.next_batch()
    assert batch["input_ids"].shape[1] <= seq_len and "segments" in batch
    row_segments = batch["segments"][0]
    assert int(row_segments.max()) >= 1  # more than one example in the row
    for s in range(int(row_segments.max()) + 1):
        where = (row_segments == s).nonzero().squeeze(-1)
        assert torch.equal(batch["positions"][0, where], torch.arange(len(where)))
        assert batch["labels"][0, where[0]] == IGNORE_INDEX  # never predicted from the previous example


def test_batches_resume_exactly_and_cover_every_example_each_epoch() -> None:
    examples, tok = _examples()
    a = SFTBatches(examples, micro_batch=3, pad_id=tok.pad_token_id, seed=2)
    seen = [a.next_batch() for _ in range(4)]  # 12 examples = one epoch
    firsts = sorted(tuple(row[row != tok.pad_token_id].tolist()) for b in seen for row in b["input_ids"])
    assert firsts == sorted(tuple(e.input_ids) for e in examples)
    state = a.state_dict()
    expected = [a.next_batch() for _ in range(3)]
    b = SFTBatches(examples, micro_batch=3, pad_id=tok.pad_token_id, seed=2)
    b.load_state_dict(state)
    for want in expected:
        got = b.next_batch()
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_ranks_split_the_same_stream() -> None:
    examples, tok = _examples()
    single = SFTBatches(examples, micro_batch=4, pad_id=tok.pad_token_id, seed=3).next_batch()
    halves = [SFTBatches(examples, micro_batch=2, pad_id=tok.pad_token_id, seed=3, rank=r, world=2).next_batch()
              for r in range(2)]
    rows = [row[row != tok.pad_token_id].tolist() for h in halves for row in h["input_ids"]]
    assert rows == [row[row != tok.pad_token_id].tolist() for row in single["input_ids"]]


def test_collate_pads_labels_with_ignore() -> None:
    examples, tok = _examples(2)
    batch = collate([[examples[0]], [examples[1]]], tok.pad_token_id)
    short = min(range(2), key=lambda i: len(examples[i]))
    assert (batch["labels"][short, len(examples[short]):] == IGNORE_INDEX).all()
