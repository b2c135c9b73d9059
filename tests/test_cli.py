"""The command line: --help on every verb, YAML configs with overrides, one-line errors."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from ember.__main__ import VERBS
from ember.cliconfig import CLIConfigError, parse_config


def ember(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ember", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_verb_has_help(verb: str) -> None:
    proc = ember(verb, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "usage: ember " + verb in proc.stdout


def test_top_level_help_lists_verbs() -> None:
    proc = ember("--help")
    assert proc.returncode == 0
    for verb in VERBS:
        assert verb in proc.stdout


@dataclass
class _Cfg:
    model: Path = field(metadata={"help": "a folder"})
    steps: int = 10
    lr: float = 1e-3
    mode: Literal["a", "b"] = "a"
    tags: list[str] = field(default_factory=list)
    verbose: bool = False
    seed: int | None = None


def test_yaml_then_flags_override(tmp_path) -> None:
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model: /m\nsteps: 20\nlr: 3.0e-4\nmode: b\ntags: [x, y]\n")
    cfg = parse_config(_Cfg, ["--config", str(cfg_file), "--steps", "30", "--verbose"], "t")
    assert cfg == _Cfg(model=Path("/m"), steps=30, lr=3e-4, mode="b", tags=["x", "y"], verbose=True)


def test_config_errors_name_the_field(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: /m\nstepz: 3\n")
    with pytest.raises(CLIConfigError, match="unknown field.*stepz"):
        parse_config(_Cfg, ["--config", str(bad)], "t")
    bad.write_text("model: /m\nsteps: many\n")
    with pytest.raises(CLIConfigError, match="steps: 'many' is not a valid int"):
        parse_config(_Cfg, ["--config", str(bad)], "t")
    with pytest.raises(CLIConfigError, match="missing required.*--model"):
        parse_config(_Cfg, [], "t")
    with pytest.raises(CLIConfigError, match="does not exist"):
        parse_config(_Cfg, ["--config", str(tmp_path / "none.yaml")], "t")


@pytest.mark.parametrize("args, needle", [
    (["generate", "--model", "/no/such/dir", "--prompt", "hi"], "does not exist"),
    (["generate", "--model", ".", "--prompt", "hi"], "tokenizer"),
    (["tokenizer", "train", "--data", "/no/such/file.txt", "--out", "x"], "does not exist"),
    (["tokenizer", "train", "--vocab-size", "ten", "--out", "x"], "vocab_size"),
])
def test_user_errors_are_one_line_without_traceback(args: list[str], needle: str, tmp_path) -> None:
    proc = ember(*args, cwd=tmp_path)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "usage:" not in ln]
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0]
