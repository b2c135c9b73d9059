"""tokenizer_from_gguf: the Tokenizer a GGUF file describes in its `tokenizer.*` metadata.

A GGUF carries no tokenizer.json: llama.cpp stores the vocabulary, merges, token types, special
ids and chat template as metadata keys. This rebuilds the Hugging Face `tokenizers` pipeline they
describe, the way transformers does for `AutoTokenizer.from_pretrained(dir, gguf_file=...)`, so
both encode a text to the same ids.

    tok = tokenizer_from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    tok = tokenizer_from_gguf(path, reader=reader)   # reuse a gguf.GGUFReader already open

Byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"`) are read, with the pre-tokenizers
in PRE_TOKENIZERS, and Gemma's SentencePiece vocabularies (model "llama" in a gemma/gemma2/gemma3
file; ember/tokenizer/gguf_spm.py); the file is read with the `gguf` package (ember[quant]).
A Gemma file without a chat template gets Gemma's (GEMMA_CHAT_TEMPLATE).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from ember.tokenizer.gguf_spm import SENTENCEPIECE_ARCHITECTURES, gemma_backend
from ember.tokenizer.tokenizer import Tokenizer, TokenizerError

if TYPE_CHECKING:
    import gguf

# llama.cpp's token types (gguf.TokenType), spelled here so the gguf import can stay lazy.
_CONTROL = 3
_USER_DEFINED = 4

# Split patterns of llama.cpp's pre-tokenizer types (src/llama-vocab.cpp). The contractions use
# (?i:...) as the models' own tokenizer.json files and transformers do; llama.cpp spells them
# '[sS] etc. because its regex engine has no inline flags.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2() -> pre_tokenizers.PreTokenizer:
    # ByteLevel's built-in pattern is GPT-2's: 's|'t|...| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _split(pattern: str) -> Callable[[], pre_tokenizers.PreTokenizer]:
    def build() -> pre_tokenizers.PreTokenizer:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    return build


# `tokenizer.ggml.pre` -> the pre-tokenizer; names that llama.cpp maps to one type share an entry.
# Where llama.cpp and transformers differ, ember follows transformers, the reference it is tested
# against: for "smollm" llama.cpp (like SmolLM's own tokenizer.json) first cuts every numeric
# character apart, which changes the ids of non-ASCII numerals such as " ½"; for "default" (also
# what a file without the key gets) it cuts punctuation runs and digit groups apart too.
PRE_TOKENIZERS: dict[str, Callable[[], pre_tokenizers.PreTokenizer]] = {
    "default": _gpt2,
    "gpt-2": _gpt2,
    "phi-2": _gpt2,
    "smollm": _gpt2,
    "llama-bpe": _split(_LLAMA3_SPLIT),
    "llama3": _split(_LLAMA3_SPLIT),
    "llama-v3": _split(_LLAMA3_SPLIT),
    "qwen2": _split(_QWEN2_SPLIT),
    "deepseek-r1-qwen": _split(_QWEN2_SPLIT),
}

# The special-token names a Tokenizer knows, keyed by the GGUF key holding each one's id.
_SPECIAL_IDS = {
    "tokenizer.ggml.bos_token_id": "bos_token",
    "tokenizer.ggml.eos_token_id": "eos_token",
    "tokenizer.ggml.unknown_token_id": "unk_token",
    "tokenizer.ggml.padding_token_id": "pad_token",
}


def tokenizer_from_gguf(path: str | os.PathLike, reader: gguf.GGUFReader | None = None) -> Tokenizer:
    """The tokenizer stored in the GGUF file `path` (read from `reader` when one is given).

    Raises TokenizerError naming the file when it cannot be read, or when its tokenizer model or
    pre-tokenizer is one ember does not support.
    """
    path = Path(path)
    meta = _Metadata(reader if reader is not None else _open(path), path)

    model = meta.text("tokenizer.ggml.model", required=True)
    arch = meta.text("general.architecture")
    if model == "llama" and arch in SENTENCEPIECE_ARCHITECTURES:
        return _gemma_tokenizer(meta)
    if model != "gpt2":
        what = "a SentencePiece vocabulary" if model == "llama" else "a vocabulary"
        raise TokenizerError(
            f"{path} holds {what} of tokenizer model {model!r}: ember reads GGUF tokenizers of model 'gpt2' "
            "(byte-level BPE) only; load the model's Hugging Face folder (tokenizer.json) instead"
        )
    pre = meta.text("tokenizer.ggml.pre") or "default"
    if pre not in PRE_TOKENIZERS:
        raise TokenizerError(
            f"{path} uses the GGUF pre-tokenizer {pre!r}, which ember does not support "
            f"(supported: {', '.join(sorted(PRE_TOKENIZERS))}); load the model's Hugging Face folder instead"
        )

    tokens = meta.texts("tokenizer.ggml.tokens")
    merges = meta.texts("tokenizer.ggml.merges")
    types = meta.integers("tokenizer.ggml.token_type")
    backend = _backend(tokens, _split_merges(merges, path), path)
    backend.pre_tokenizer = PRE_TOKENIZERS[pre]()
    backend.decoder = decoders.ByteLevel()
    _add_typed_tokens(backend, tokens, types)

    special: dict[str, str] = {}
    for key, name in _SPECIAL_IDS.items():
        idx = meta.integer(key)
        # llama.cpp ignores an id outside the vocabulary (with a warning); so does ember.
        if idx is not None and 0 <= idx < len(tokens):
            special[name] = backend.id_to_token(idx)
    backend.post_processor = _post_processor(
        bos=special.get("bos_token") if meta.flag("tokenizer.ggml.add_bos_token") else None,
        eos=special.get("eos_token") if meta.flag("tokenizer.ggml.add_eos_token") else None,
        backend=backend,
    )
    tokenizer = Tokenizer(backend, special_tokens=special, chat_template=meta.text("tokenizer.chat_template"))
    tokenizer.gguf_pre = pre
    return tokenizer


def _gemma_tokenizer(meta: "_Metadata") -> Tokenizer:
    tokens = meta.texts("tokenizer.ggml.tokens")
    special = _special_tokens(meta, tokens)
    backend = gemma_backend(tokens, meta.integers("tokenizer.ggml.token_type"), special.get("unk_token", "<unk>"))
    # llama.cpp adds BOS to a SentencePiece vocabulary unless the file says otherwise.
    add_bos = meta._get("tokenizer.ggml.add_bos_token", lambda v: v is None or isinstance(v, bool), "a boolean")
    backend.post_processor = _post_processor(
        bos=special.get("bos_token") if add_bos is not False else None,
        eos=special.get("eos_token") if meta.flag("tokenizer.ggml.add_eos_token") else None, backend=backend)
    template = meta.text("tokenizer.chat_template") or GEMMA_CHAT_TEMPLATE
    return Tokenizer(backend, special_tokens=special, chat_template=template)


def _special_tokens(meta: "_Metadata", tokens: list[str]) -> dict[str, str]:
    special: dict[str, str] = {}
    for key, name in _SPECIAL_IDS.items():
        idx = meta.integer(key)
        # llama.cpp ignores an id outside the vocabulary (with a warning); so does ember.
        if idx is not None and 0 <= idx < len(tokens):
            special[name] = tokens[idx]
    return special


# Gemma's chat template (Gemma 3's tokenizer_config.json, text content only): the system prompt
# joins the first user turn, the assistant's role is "model", turns end with <end_of_turn>.
GEMMA_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- set role = "model" if message['role'] == 'assistant' else message['role'] -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {{- message['content'] | trim }}
    {{- '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\n' }}
{%- endif -%}
"""


def _open(path: Path) -> gguf.GGUFReader:
    from ember.checkpoint.gguf import open_gguf  # imported late: the checkpoint package loads torch

    return open_gguf(path, TokenizerError)


class _Metadata:
    """Typed reads of a GGUF's key-value metadata; a key of the wrong type is a TokenizerError."""

    def __init__(self, reader: gguf.GGUFReader, path: Path) -> None:
        self._fields = reader.fields
        self._path = path

    def _get(self, key: str, check: Callable[[Any], bool], kind: str, required: bool = False) -> Any:
        field = self._fields.get(key)
        if field is None:
            if required:
                raise TokenizerError(f"{self._path} has no {key} in its metadata: it carries no usable tokenizer")
            return None
        try:
            value = field.contents()
        except UnicodeDecodeError:
            value = None
        if not check(value):
            raise TokenizerError(f"{self._path}: GGUF key {key} is not {kind}: export the file again")
        return value

    def text(self, key: str, required: bool = False) -> str | None:
        return self._get(key, lambda v: isinstance(v, str), "a UTF-8 string", required)

    def texts(self, key: str) -> list[str]:
        return self._get(key, lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v),
                         "an array of UTF-8 strings", required=True)

    def integers(self, key: str) -> list[int]:
        found = self._get(key, lambda v: isinstance(v, list) and all(type(i) is int for i in v),
                          "an array of integers")
        return found or []

    def integer(self, key: str) -> int | None:
        return self._get(key, lambda v: type(v) is int, "an integer")

    def flag(self, key: str) -> bool:
        return bool(self._get(key, lambda v: isinstance(v, bool), "a boolean"))


@lru_cache(maxsize=1)
def _byte_chars() -> tuple[str, ...]:
    """GPT-2's byte-level alphabet: the character that stands for each byte 0..255 in the vocabulary.

    Printable Latin-1 bytes stand for themselves; the other bytes take the characters from U+0100 up,
    in byte order.
    """
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return tuple(chars)


@lru_cache(maxsize=1)
def _alphabet() -> frozenset[str]:
    return frozenset(_byte_chars())


def _byte_level(token: str) -> str:
    # A token written as plain text (by a converter that skipped the byte alphabet) is respelled,
    # as transformers does, so that BPE can reach it.
    if set(token) <= _alphabet():
        return token
    chars = _byte_chars()
    return "".join(chars[b] for b in token.encode("utf-8"))


def _split_merges(merges: list[str], path: Path) -> list[tuple[str, str]]:
    pairs = []
    for merge in merges:
        parts = merge.split(" ")
        if len(parts) != 2:
            raise TokenizerError(
                f"{path}: merge {merge!r} is not two tokens separated by one space: export the file again")
        pairs.append((parts[0], parts[1]))
    return pairs


def _backend(tokens: list[str], merges: list[tuple[str, str]], path: Path) -> tokenizers.Tokenizer:
    # A later duplicate spelling wins, as in transformers' dict of the vocabulary.
    vocab = {_byte_level(token): idx for idx, token in enumerate(tokens)}
    try:
        model = models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False)
    except Exception as e:  # the Rust side raises plain Exception, e.g. for a merge of unknown tokens
        raise TokenizerError(
            f"{path}: the GGUF vocabulary and merges do not fit together ({e}): export the file again") from None
    return tokenizers.Tokenizer(model)


def _add_typed_tokens(backend: tokenizers.Tokenizer, tokens: list[str], types: list[int]) -> None:
    """Make control tokens special added tokens and user-defined ones plain added tokens.

    Added tokens are matched whole in the text before BPE runs, as llama.cpp matches them.
    A token spelled outside the byte alphabet is skipped: in a byte-level vocabulary that is a
    mislabel, and transformers skips it too.
    """
    alphabet = _alphabet()
    control, user = [], []
    for token, kind in zip(tokens, types):
        if kind in (_CONTROL, _USER_DEFINED) and token and set(token) <= alphabet:
            (control if kind == _CONTROL else user).append(
                AddedToken(token, special=kind == _CONTROL, normalized=False))
    if control:
        backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)


def _post_processor(bos: str | None, eos: str | None, backend: tokenizers.Tokenizer) -> processors.PostProcessor | None:
    """BOS/EOS around each encoding, added exactly when the file's add_bos_token/add_eos_token say so."""
    if bos is None and eos is None:
        return None
    first = [bos] if bos is not None else []
    last = [eos] if eos is not None else []
    single = [*first, "$A", *last]
    pair = [*single, *(f"{t}:1" for t in first), "$B:1", *(f"{t}:1" for t in last)]
    ids = [(t, backend.token_to_id(t)) for t in dict.fromkeys(first + last)]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=ids)
