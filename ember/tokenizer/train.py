"""train_tokenizer: learn a byte-level BPE or Unigram vocabulary for ember's own models.

Byte-level means text is first mapped to its UTF-8 bytes (GPT-2's printable byte alphabet),
and all 256 bytes are in the vocabulary from the start: any string encodes without an unknown
token, and decode(encode(s)) == s exactly, since there is no normalizer. There is no
post-processor either: encode() adds no BOS/EOS; pretraining puts EOS between documents itself.

    tok = train_tokenizer(lines, vocab_size=32_000)   # lines: any iterable of str
    tok.save("tokenizer/")
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence, Sized
from typing import Literal

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from ember.tokenizer.chat_template import DEFAULT_CHAT_TEMPLATE
from ember.tokenizer.tokenizer import Tokenizer, TokenizerError

DEFAULT_SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>")


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    kind: Literal["bpe", "unigram"] = "bpe",
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    chat_template: str | None = DEFAULT_CHAT_TEMPLATE,
    show_progress: bool = True,
    min_frequency: int = 2,
) -> Tokenizer:
    """Train a byte-level tokenizer on `texts` with `vocab_size` ids in total.

    The special tokens get the first ids in order; the first is BOS and EOS, and "<|pad|>"
    is PAD when present. min_frequency (pairs seen fewer times are not merged) is BPE-only.
    Raises TokenizerError for a vocab_size that leaves no room for learned tokens, an
    unknown kind, or texts that hold no text at all.
    """
    special_tokens = list(dict.fromkeys(special_tokens))
    floor = 256 + len(special_tokens)
    if vocab_size <= floor:
        raise TokenizerError(
            f"vocab_size={vocab_size} is too small: it must exceed 256 bytes + {len(special_tokens)} "
            f"special tokens = {floor}; use e.g. {max(1024, floor * 2)}"
        )
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if kind == "bpe":
        # No unk token: every byte is in the alphabet, so there is nothing unknown to map.
        backend = tokenizers.Tokenizer(models.BPE())
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special_tokens,
            initial_alphabet=alphabet, show_progress=show_progress,
        )
    elif kind == "unigram":
        backend = tokenizers.Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=special_tokens, initial_alphabet=alphabet,
            show_progress=show_progress,
        )
    else:
        raise TokenizerError(f"unknown tokenizer kind {kind!r}: use 'bpe' or 'unigram'")
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()

    # The Rust trainer happily "trains" on nothing, so look for the first text before starting.
    stream = (text for text in map(_checked, texts) if text)
    first = next(stream, None)
    if first is None:
        raise TokenizerError("no text to train the tokenizer on: the input yielded no non-empty strings")
    length = len(texts) if isinstance(texts, Sized) else None
    backend.train_from_iterator(itertools.chain([first], stream), trainer=trainer, length=length)

    named: dict[str, str] = {}
    if special_tokens:
        named["bos_token"] = named["eos_token"] = special_tokens[0]
    if "<|pad|>" in special_tokens:
        named["pad_token"] = "<|pad|>"
    return Tokenizer(backend, special_tokens=named, chat_template=chat_template)


def _checked(text: object) -> str:
    if not isinstance(text, str):
        raise TokenizerError(f"training texts must be str, got {type(text).__name__}: decode bytes first")
    return text
