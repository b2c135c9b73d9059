"""Gemma's SentencePiece-BPE vocabulary from GGUF metadata (`tokenizer.ggml.model == "llama"`).

A Gemma GGUF stores the vocabulary and token types but no merges. This rebuilds the `tokenizers`
pipeline that transformers builds for `AutoTokenizer.from_pretrained(dir, gguf_file=...)` on a
gemma/gemma2/gemma3 file (its GemmaTokenizer), so both encode a text to the same ids:

  * tokens of two or more blanks are stored as spaces but looked up as "▁" runs: respelled;
  * merges recovered from the vocabulary: every split of a token into two tokens, ordered by the
    token's position in the file (Gemma's scores do not follow its merge order, the order does);
  * BPE with byte fallback and <unk>; spaces normalised to "▁", no prefix space;
  * control tokens special and user-defined ones plain added tokens, both matched whole.
"""

from __future__ import annotations

import tokenizers
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers

SPACE = "\u2581"
SENTENCEPIECE_ARCHITECTURES = ("gemma", "gemma2", "gemma3")
_CONTROL, _USER_DEFINED = 3, 4


def _merges(tokens: list[str]) -> list[tuple[str, str]]:
    """Pairs (left, right) whose concatenation is a token, best (earliest token) first."""
    vocab = {t: i for i, t in enumerate(tokens)}
    found: list[tuple[int, int, int, str, str]] = []
    for index, token in enumerate(tokens):
        local = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab]
        local.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
        found += [(index, -len(left), -len(right), left, right) for left, right in local]
    # transformers: sorted by (score = -index, len(left), len(right)) descending, stably.
    found.sort(key=lambda m: (m[0], m[1], m[2]))
    return [(left, right) for _, _, _, left, right in found]


def gemma_backend(tokens: list[str], types: list[int], unk: str) -> tokenizers.Tokenizer:
    """The tokenizers pipeline of Gemma's tokenizer over a GGUF vocabulary."""
    tokens = [SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    backend = tokenizers.Tokenizer(models.BPE(vocab, _merges(tokens), fuse_unk=True, unk_token=unk,
                                              byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", SPACE)
    backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    backend.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    control = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _CONTROL]
    if control:
        backend.add_special_tokens(control)
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED]
    if user:
        backend.add_tokens(user)
    return backend
