"""The Tokenizer: text <-> token ids, special tokens and the chat template of one model.

A thin layer over Hugging Face `tokenizers` (the Rust implementation does the algorithm)
that reads and writes the Hugging Face tokenizer folder layout, so a folder saved here loads
in `transformers.AutoTokenizer` and a Hub model folder loads here, encoding identically.

    tok = load_tokenizer("path/to/model")        # folder with tokenizer.json, or the file
    ids = tok.encode("Hello")                      # list[int]
    text = tok.decode(ids)
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    tok.save("out_dir")
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers

from ember.atomic import atomic_write_json, atomic_write_text
from ember.errors import EmberError

# The named special tokens transformers knows; all of them are visible to chat templates.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class TokenizerError(EmberError):
    """A problem the user can fix (bad path, bad file, bad argument); the message says how."""


class Tokenizer:
    """Encodes and decodes text for one model; see the module docstring for use.

    `special_tokens` maps names from SPECIAL_TOKEN_NAMES to token strings. A named token the
    vocabulary lacks is added as a special token, as transformers does when it loads the folder.
    """

    # The `tokenizer.ggml.pre` name of the GGUF it was read from (None otherwise): ember may map
    # two names to one pre-tokenizer, so a GGUF export needs the name itself to write it back.
    gguf_pre: str | None = None

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        special_tokens: Mapping[str, str] | None = None,
        chat_template: str | None = None,
        model_max_length: int | None = None,
    ) -> None:
        special_tokens = dict(special_tokens or {})
        unknown = set(special_tokens) - set(SPECIAL_TOKEN_NAMES)
        if unknown:
            raise TokenizerError(f"unknown special token names {sorted(unknown)}: use {', '.join(SPECIAL_TOKEN_NAMES)}")
        # transformers ignores padding/truncation stored in tokenizer.json unless asked per call;
        # left on, they would silently pad or cut every batch.
        backend.no_padding()
        backend.no_truncation()
        missing = [t for t in special_tokens.values() if backend.token_to_id(t) is None]
        if missing:
            backend.add_special_tokens(list(dict.fromkeys(missing)))
        self._backend = backend
        self._special_tokens = special_tokens
        self.chat_template = chat_template
        self.model_max_length = model_max_length

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying `tokenizers.Tokenizer` (for incremental detokenization, offsets, ...)."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included: the embedding table needs at least this many rows."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def special_tokens(self) -> dict[str, str]:
        """Named special tokens, as chat templates see them ({"bos_token": "<s>", ...})."""
        return dict(self._special_tokens)

    @property
    def bos_token(self) -> str | None:
        return self._special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self._special_tokens.get("eos_token")

    @property
    def pad_token(self) -> str | None:
        return self._special_tokens.get("pad_token")

    @property
    def unk_token(self) -> str | None:
        return self._special_tokens.get("unk_token")

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self._backend.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self._backend.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return None if self.pad_token is None else self._backend.token_to_id(self.pad_token)

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of the named special tokens and of every added token marked special.

        Wider than transformers' (named + extra tokens only): it is exactly the set that
        decode(skip_special_tokens=True) drops, e.g. <|im_start|> in ember's tokenizers.
        """
        ids = {self._backend.token_to_id(t) for t in self._special_tokens.values()}
        ids |= {i for i, t in self._backend.get_added_tokens_decoder().items() if t.special}
        return sorted(ids)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        tokens = []
        for i in ids:
            token = self._backend.id_to_token(int(i))
            if token is None:
                raise TokenizerError(f"token id {i} is outside the vocabulary of size {self.vocab_size}")
            tokens.append(token)
        return tokens

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; add_special_tokens runs tokenizer.json's post-processor (e.g. BOS), if any."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """encode() for many texts at once, in parallel threads in Rust; the path for corpora."""
        # The fast variant skips computing character offsets, which nobody here reads.
        encodings = self._backend.encode_batch_fast(list(texts), add_special_tokens=add_special_tokens)
        return [e.ids for e in encodings]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render a conversation to prompt text, or to its ids when tokenize=True.

        Note the default add_generation_prompt=True (transformers defaults to False): the
        prompt ends ready for the assistant's reply. Ids come from encode(..., add_special_tokens=False)
        because the template already wrote any BOS it wants, as transformers does.
        """
        # Imported here because chat_template imports TokenizerError from this module.
        from ember.tokenizer.chat_template import render_chat_template

        if self.chat_template is None:
            raise TokenizerError(
                "this tokenizer has no chat template: add chat_template.jinja to its folder "
                "or set tokenizer.chat_template (ember.tokenizer.DEFAULT_CHAT_TEMPLATE is ChatML)"
            )
        text = render_chat_template(
            self.chat_template, messages, add_generation_prompt, self._special_tokens, tools=tools, **kwargs
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def save(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `directory`.

        Each file is replaced atomically; other files in the folder are kept, except that a
        chat_template.jinja/.json that would override the template saved here is updated or removed.
        """
        out = Path(directory)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TokenizerError(
                f"cannot create tokenizer folder {out} ({e.strerror}): choose a writable path"
            ) from None
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", **self._special_tokens}
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        config["added_tokens_decoder"] = {
            str(i): {"content": t.content, "lstrip": t.lstrip, "rstrip": t.rstrip, "normalized": t.normalized,
                     "single_word": t.single_word, "special": t.special}
            for i, t in sorted(self._backend.get_added_tokens_decoder().items())
        }
        atomic_write_text(out / "tokenizer.json", self._backend.to_str(pretty=True))
        atomic_write_json(out / "tokenizer_config.json", config)
        atomic_write_json(out / "special_tokens_map.json", self._special_tokens)
        # load_tokenizer (and transformers) prefer chat_template.jinja over the config, and fall
        # back to chat_template.json when the config has none: neither may shadow this template.
        jinja, legacy = out / "chat_template.jinja", out / "chat_template.json"
        if jinja.exists() and self.chat_template is not None:
            atomic_write_text(jinja, self.chat_template)
        elif self.chat_template is None:
            jinja.unlink(missing_ok=True)
            legacy.unlink(missing_ok=True)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        model = type(self._backend.model).__name__
        return f"Tokenizer({model}, vocab_size={self.vocab_size}, special_tokens={self._special_tokens})"

