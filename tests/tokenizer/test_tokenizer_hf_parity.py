"""Parity with transformers: folders ember saves load there and encode identically, Hub-shaped
folders load here and encode identically, and ember's ChatML template renders the same."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ember.tokenizer import Tokenizer, load_tokenizer


@pytest.fixture(scope="module")
def strings(corpus: list[str]) -> list[str]:
    """A few hundred varied strings: corpus lines, mixed scripts, whitespace, special tokens."""
    rng = random.Random(0)
    lines = [line for doc in corpus for line in doc.splitlines()]
    pieces = ["Hello", " world", "😀", "👩‍👩‍👧", "東京", "Привет", "e\u0301", "\x00", "\t\t", "   ", "\n\n",
              "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|pad|>", "don't", "3.14159", "def f(x):"]
    out = rng.sample(lines, 200)
    out += ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 8))) for _ in range(150)]
    out += ["", " ", " leading", "trailing ", "a<|im_end|>b", "<|im_start|>user\nhi<|im_end|>\n"]
    return out


def _hf_ids(hf: PreTrainedTokenizerFast, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    return hf(texts, add_special_tokens=add_special_tokens)["input_ids"]


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_saved_folder_loads_in_transformers(kind: str, request: pytest.FixtureRequest, tmp_path: Path,
                                            strings: list[str]) -> None:
    tok: Tokenizer = request.getfixturevalue(kind)
    tok.save(tmp_path)
    by_file = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(tmp_path)
    for hf in (by_file, auto):
        assert len(hf) == tok.vocab_size
        for add in (True, False):
            assert _hf_ids(hf, strings, add) == [tok.encode(s, add_special_tokens=add) for s in strings]
        assert [hf.encode(s) for s in strings] == tok.encode_batch(strings)
    assert (auto.bos_token, auto.eos_token, auto.pad_token) == (tok.bos_token, tok.eos_token, tok.pad_token)
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert auto.chat_template == tok.chat_template
    for ids in tok.encode_batch(strings):
        for skip in (False, True):
            assert auto.decode(ids, skip_special_tokens=skip) == tok.decode(ids, skip_special_tokens=skip)


def test_default_chat_template_matches_transformers(bpe: Tokenizer, bpe_dir: Path) -> None:
    hf = AutoTokenizer.from_pretrained(bpe_dir)
    conversations = [
        [{"role": "user", "content": "Hi!"}],
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"}],
        [{"role": "system", "content": "Sé breve 😀"}, {"role": "user", "content": "  spaced \n"},
         {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}],
        [{"role": "user", "content": [{"type": "text", "text": "part one, "}, {"type": "text", "text": "two"}]}],
    ]
    for messages in conversations:
        for gen in (True, False):
            ours = bpe.apply_chat_template(messages, add_generation_prompt=gen)
            assert ours == hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
            assert bpe.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True) == (
                hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, return_dict=False))
    rendered = bpe.apply_chat_template(conversations[1])
    assert rendered == ("<|im_start|>system\nBe terse.<|im_end|>\n"
                        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")
    ids = bpe.apply_chat_template(conversations[1], tokenize=True)
    assert ids[0] == bpe.token_to_id("<|im_start|>") and ids.count(bpe.token_to_id("<|im_end|>")) == 2


def test_hub_folder_with_bos_post_processor(hf_folder, bpe_dir: Path, strings: list[str]) -> None:
    """A Llama-shaped folder: BOS added by tokenizer.json's post-processor, specials only in the config."""
    tokenizer_json = json.loads((bpe_dir / "tokenizer.json").read_text())
    n = len(tokenizer_json["model"]["vocab"])
    bos = {"id": n, "content": "<s>", "single_word": False, "lstrip": False, "rstrip": False,
           "normalized": False, "special": True}
    tokenizer_json["added_tokens"].append(bos)
    tokenizer_json["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [n], "tokens": ["<s>"]}},
    }
    entry = {k: v for k, v in bos.items() if k != "id"}
    folder = hf_folder(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
         "unk_token": None, "model_max_length": 1000000000000000019884624838656,
         "added_tokens_decoder": {str(n): entry, str(n + 1): {**entry, "content": "</s>"},
                                  str(n + 2): {**entry, "content": "<tool>", "special": False}}},
        tokenizer_json=tokenizer_json,
    )
    ours = load_tokenizer(folder)
    hf = AutoTokenizer.from_pretrained(folder)
    assert ours.vocab_size == len(hf)
    assert (ours.bos_token_id, ours.eos_token_id) == (hf.bos_token_id, hf.eos_token_id) == (n, n + 1)
    assert ours.token_to_id("<tool>") == hf.convert_tokens_to_ids("<tool>") == n + 2
    assert ours.model_max_length is None
    texts = strings + ["x</s>y<tool>z<s>"]
    for add in (True, False):
        assert _hf_ids(hf, texts, add) == [ours.encode(s, add_special_tokens=add) for s in texts]
    assert ours.encode("hi")[0] == n and ours.encode("hi", add_special_tokens=False)[0] != n
    assert ours.decode(ours.encode("hi <tool>"), skip_special_tokens=True) == "hi <tool>"


def test_padding_and_truncation_in_tokenizer_json_are_ignored(hf_folder, bpe_dir: Path) -> None:
    """transformers only pads/truncates when a call asks; a tokenizer.json that stores either
    must not pad or cut ember's batches."""
    tokenizer_json = json.loads((bpe_dir / "tokenizer.json").read_text())
    tokenizer_json["padding"] = {"strategy": {"Fixed": 64}, "direction": "Right", "pad_to_multiple_of": None,
                                 "pad_id": 1, "pad_type_id": 0, "pad_token": "<|pad|>"}
    tokenizer_json["truncation"] = {"direction": "Right", "max_length": 3, "strategy": "LongestFirst", "stride": 0}
    folder = hf_folder({"pad_token": "<|pad|>"}, tokenizer_json=tokenizer_json)
    texts = ["a much longer piece of text than three tokens", "hi"]
    ours = load_tokenizer(folder).encode_batch(texts)
    assert ours == AutoTokenizer.from_pretrained(folder)(texts)["input_ids"]
    assert len(ours[0]) > 3 and len(ours[1]) < 64
