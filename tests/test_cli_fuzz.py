"""Bad input to every verb ends in one line on stderr and a non-zero exit, never a traceback.

The argument space of each verb (and subcommand) is read from its config dataclass and fuzzed a
little: every input path missing, an empty folder, or a file of garbage; numbers that are not
numbers. Every case keeps at least one input invalid so no verb starts real work. It runs
in-process through ember.__main__.main (a traceback there is an exception escaping main).
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from pathlib import Path
from typing import Any, Literal

import pytest

from ember.__main__ import VERBS, main

OUTPUTS = {"out", "plot", "save_result", "final_model", "data_dir"}  # written, not read: left valid


def verb_configs() -> list[tuple[list[str], type]]:
    """([verb] or [verb, subcommand], its config dataclass) for every verb."""
    found = []
    for verb in VERBS:
        module = importlib.import_module(f"ember.commands.{verb}")
        subcommands = getattr(module, "SUBCOMMANDS", None)
        if subcommands:
            found += [([verb, name], cls) for name, (cls, _) in subcommands.items()]
        else:
            found.append(([verb], module.CONFIG))
    return found


def is_path(tp: Any) -> bool:
    return tp is Path or Path in typing.get_args(tp)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def argv(cls: type, paths: str, out: Path, extra: dict[str, str] | None = None) -> list[str] | None:
    """Flags for cls: every input path set to `paths`, outputs under `out`, other required
    fields given plausible values, then `extra`; None if the verb reads no input path."""
    hints = typing.get_type_hints(cls)
    args, inputs = [], 0
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.name in OUTPUTS and (required or is_path(tp)):
            args += [flag(f.name), str(out / f.name)]
        elif is_path(tp) or (f.name == "paths"):
            args += [flag(f.name), paths]
            inputs += 1
        elif required:
            origin = typing.get_origin(tp)
            value = (str(typing.get_args(tp)[0]) if origin is Literal else
                     "1" if tp in (int, float) else "hi")
            args += [flag(f.name), value]
    for name, value in (extra or {}).items():
        args += [flag(name), value]
    return args if inputs else None


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz")
    (root / "empty").mkdir()
    (root / "garbage.bin").write_bytes(bytes(range(256)) * 16)
    return {"missing": root / "no" / "such" / "thing", "empty": root / "empty", "garbage": root / "garbage.bin"}


def one_line_failure(args: list[str], capsys) -> str:
    """Run `ember *args` in-process; assert a non-zero exit with one line on stderr; return it."""
    capsys.readouterr()  # what the test's own setup printed
    with pytest.raises(SystemExit) as e:  # any other exception escaping main is a traceback
        main(args)
    err = capsys.readouterr().err
    assert e.value.code not in (0, None), f"ember {' '.join(args)} exited 0"
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("usage:", " "))]
    assert len(lines) == 1 and "Traceback" not in err, f"ember {' '.join(args)}:\n{err}"
    return lines[0]


def reads_input(cls: type) -> bool:
    return argv(cls, "x", Path("out")) is not None


def number_fields(cls: type) -> list[str]:
    hints = typing.get_type_hints(cls)
    return [f.name for f in dataclasses.fields(cls) if hints[f.name] in (int, float)]


def _id(words: list[str], what: str) -> str:
    return f"{' '.join(words)}-{what}"


CASES = verb_configs()
# Only the cases that apply: a verb without input paths has no bad path to give it, and a verb
# without one to keep invalid is given only an unparsable number (any other value would start real
# work), except `scaling plan`, which is instant, so every value is tried there.
PATH_CASES = [(w, cls, kind) for w, cls in CASES if reads_input(cls) for kind in ("missing", "empty", "garbage")]
NUMBER_CASES = [(w, cls, value) for w, cls in CASES if number_fields(cls)
                for value in ("abc", "1e999", "nan", "-1")
                if reads_input(cls) or value == "abc" or w == ["scaling", "plan"]]


@pytest.mark.parametrize("words, cls, kind", PATH_CASES, ids=[_id(w, k) for w, _, k in PATH_CASES])
def test_bad_input_paths_are_one_line(words: list[str], cls: type, kind: str, bad_inputs, tmp_path, capsys) -> None:
    one_line_failure([*words, *argv(cls, str(bad_inputs[kind]), tmp_path)], capsys)


@pytest.mark.parametrize("words, cls, value", NUMBER_CASES, ids=[_id(w, v) for w, _, v in NUMBER_CASES])
def test_bad_numbers_are_one_line(words: list[str], cls: type, value: str, bad_inputs, tmp_path, capsys) -> None:
    name = number_fields(cls)[0]
    # With an input path missing as well, so that a number the verb accepts starts no real work.
    args = argv(cls, str(bad_inputs["missing"]), tmp_path, {name: value})
    if args is None:
        args = argv(cls, "", tmp_path, {name: value}) or [flag(name), value]
    one_line_failure([*words, *args], capsys)


def test_every_verb_is_fuzzed() -> None:
    fuzzed = {" ".join(w) for w, _, _ in PATH_CASES + NUMBER_CASES}
    assert fuzzed == {" ".join(w) for w, _ in CASES}


def test_quantize_with_a_tokenizer_without_bos_or_eos_is_one_line(tmp_path, capsys) -> None:
    from ember.tokenizer import train_tokenizer
    from tests.hf_models import make_hf_model

    model = tmp_path / "model"
    make_hf_model("llama-linear-rope", model)
    tok = train_tokenizer(["hello world, some text to learn from"] * 20, vocab_size=300, special_tokens=(),
                          chat_template=None, show_progress=False)
    tok.save(model)
    line = one_line_failure(["quantize", "--model", str(model), "--out", str(tmp_path / "q"),
                             "--eval-tokens", "2000"], capsys)
    assert "BOS or EOS" in line
