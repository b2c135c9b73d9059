"""Property: ember's byte-level tokenizers are lossless, decode(encode(s)) == s for any text,
and never fall back to an unknown token."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import pre_tokenizers

from ember.tokenizer import Tokenizer

# Pieces a uniform draw over Unicode rarely produces but real text is full of.
_TRICKY = ["😀", "👩‍👩‍👧", "🇯🇵", "中文", "字", "한국어", "e\u0301", "é", "ß", "\u200d", "\ufeff",
           " ", "  ", "\t", "\n", "\r\n", "\x00", "\u00a0", "\u3000", "\U0010fffd",
           "<|im_start|>", "<|endoftext|>", "<|im_end|>", "'s", " def", "ing"]

_texts = st.lists(
    st.one_of(
        st.text(st.characters(codec="utf-8")),   # any code point but surrogates, NUL and controls included
        st.lists(st.sampled_from(_TRICKY), max_size=8).map("".join),
        st.text(st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF)),
        st.text(st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF)),
        st.text(" \t\n\r\x0b\x0c", min_size=1),
    ),
    max_size=6,
).map("".join)


def _unk_id(tok: Tokenizer) -> int | None:
    model = json.loads(tok.backend.to_str())["model"]
    if model["type"] == "BPE":
        return None if model["unk_token"] is None else tok.token_to_id(model["unk_token"])
    return model["unk_id"]


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_byte_alphabet_complete_and_no_unk(kind: str, request: pytest.FixtureRequest) -> None:
    tok: Tokenizer = request.getfixturevalue(kind)
    vocab = tok.backend.get_vocab()
    assert all(symbol in vocab for symbol in pre_tokenizers.ByteLevel.alphabet())
    assert _unk_id(tok) is None


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_decode_encode_is_identity(kind: str, request: pytest.FixtureRequest) -> None:
    tok: Tokenizer = request.getfixturevalue(kind)
    unk = _unk_id(tok)

    @settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(_texts)
    def check(text: str) -> None:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert unk is None or unk not in ids
        assert all(0 <= i < tok.vocab_size for i in ids)

    check()


def test_encode_batch_matches_encode(bpe: Tokenizer, corpus: list[str]) -> None:
    texts = [line for doc in corpus[:20] for line in doc.splitlines()][:500] + ["", "😀 x"]
    assert bpe.encode_batch(texts) == [bpe.encode(t) for t in texts]
