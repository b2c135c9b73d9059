"""load_tokenizer: read a Hugging Face tokenizer folder (or a bare tokenizer.json) into a Tokenizer.

The folder layout is the one transformers writes and the Hub serves:
    tokenizer.json            the tokenizers pipeline (required)
    tokenizer_config.json     named special tokens, added_tokens_decoder, chat_template, model_max_length
    special_tokens_map.json   legacy special tokens (read only when the config has no added_tokens_decoder)
    chat_template.jinja       the chat template (newer transformers); wins over the config's
    chat_template.json        {"chat_template": ...} (older); used when nothing else has a template
The precedence rules follow transformers, so both read a folder the same way.

A GGUF file, a folder holding one GGUF and no tokenizer.json, or the name of an installed model
(ember.checkpoint.registry) loads the tokenizer stored in the GGUF's metadata instead.

    tok = load_tokenizer("path/to/model")
    tok = load_tokenizer("smollm2-135m-instruct")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import tokenizers

from ember.jsonfile import read_json_object
from ember.tokenizer.gguf import tokenizer_from_gguf
from ember.tokenizer.tokenizer import SPECIAL_TOKEN_NAMES, Tokenizer, TokenizerError

# transformers writes int(1e30) as model_max_length when a model has no known limit.
_UNBOUNDED = int(1e29)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load the tokenizer in folder `path`, or from `path` itself when it is a tokenizer.json file.

    For a file, the config files beside it are read too. A GGUF file or a known model name (see
    the module docstring) reads the GGUF's tokenizer. Raises TokenizerError naming the path when
    something is missing or unreadable.
    """
    # Imported here: ember.checkpoint's package imports torch and the model code.
    from ember.checkpoint.registry import ModelNotFoundError, gguf_file, resolve_model_path

    try:
        p = resolve_model_path(path)
        # tokenizer.json wins over a GGUF beside it, so Hugging Face folders load as before.
        gguf = None if (p / "tokenizer.json").is_file() else gguf_file(p)
    except ModelNotFoundError as e:
        raise TokenizerError(str(e)) from None
    if gguf is not None:
        return tokenizer_from_gguf(gguf)
    if not p.exists():
        raise TokenizerError(
            f"no tokenizer at {p}: the path does not exist (ember reads local folders; "
            "fetch Hub models first with `hf download <repo> --local-dir <dir>`)"
        )
    folder, file = (p, p / "tokenizer.json") if p.is_dir() else (p.parent, p)
    if not file.is_file():
        raise TokenizerError(
            f"no tokenizer.json in {folder}: train one with `ember tokenizer train` "
            "or point --tokenizer at a Hugging Face model folder or a GGUF file"
        )
    try:
        backend = tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust side raises plain Exception with a serde message
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TokenizerError(
            f"{file} is not a valid tokenizer.json ({reason}): copy it again from the model or retrain it"
        ) from None

    config = _read_json(folder / "tokenizer_config.json")
    special = {name: tok for name in SPECIAL_TOKEN_NAMES if (tok := _token_str(config.get(name))) is not None}
    if "added_tokens_decoder" in config:
        _add_missing_tokens(backend, config["added_tokens_decoder"], folder / "tokenizer_config.json")
    else:
        legacy = _read_json(folder / "special_tokens_map.json")
        special |= {k: t for k in SPECIAL_TOKEN_NAMES if (t := _token_str(legacy.get(k))) is not None}

    return Tokenizer(
        backend,
        special_tokens=special,
        chat_template=_chat_template(folder, config),
        model_max_length=_max_length(config.get("model_max_length")),
    )


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, TokenizerError, "fix or delete the file", missing_ok=True)


def _token_str(value: Any) -> str | None:
    # Special tokens are saved either as "<s>" or as AddedToken dicts {"content": "<s>", ...}.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _add_missing_tokens(backend: tokenizers.Tokenizer, decoder: Any, source: Path) -> None:
    # transformers adds config-only added tokens to the backend; ids must match for the model.
    if not isinstance(decoder, dict):
        raise TokenizerError(f"added_tokens_decoder in {source} must map ids to tokens: fix or delete the entry")
    try:
        entries = [entry for _, entry in sorted(decoder.items(), key=lambda kv: int(kv[0]))]
    except ValueError:
        raise TokenizerError(
            f"added_tokens_decoder in {source} has a non-integer id: fix or delete the entry"
        ) from None
    for entry in entries:
        content = _token_str(entry)
        if not isinstance(entry, dict) or content is None or backend.token_to_id(content) is not None:
            continue
        options = {k: entry[k] for k in ("single_word", "lstrip", "rstrip", "normalized") if k in entry}
        backend.add_tokens([tokenizers.AddedToken(content, special=bool(entry.get("special", False)), **options)])


def _chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    if config.get("chat_template") is not None:
        return _pick_template(config["chat_template"], folder / "tokenizer_config.json")
    legacy = _read_json(folder / "chat_template.json")
    if legacy.get("chat_template") is not None:
        return _pick_template(legacy["chat_template"], folder / "chat_template.json")
    return None


def _pick_template(value: Any, source: Path) -> str:
    if isinstance(value, str):
        return value
    # Several named templates are stored as [{"name": ..., "template": ...}]; prompts use "default".
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise TokenizerError(
            f"{source} has chat templates {sorted(map(str, named))} but none named 'default': "
            "rename the one to use to 'default'"
        )
    raise TokenizerError(f"chat_template in {source} must be a string or a list of named templates")


def _max_length(value: Any) -> int | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < _UNBOUNDED:
        return int(value)
    return None
