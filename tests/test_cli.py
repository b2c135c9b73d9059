"""The command line: --help on every verb, YAML configs with overrides, one-line errors."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from ember.__main__ import VERBS, run
from ember.cliconfig import CLIConfigError, parse_config


def ember(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ember", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_verb_has_help(verb: str, capsys) -> None:
    try:
        code = run([verb, "--help"])
    except SystemExit as e:  # argparse exits after printing help
        code = e.code
    assert code == 0
    assert "usage: ember " + verb in capsys.readouterr().out


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


@pytest.fixture(scope="module")
def broken_models(tmp_path_factory) -> dict[str, Path]:
    """Model folders (each with a valid tokenizer) broken in the ways users break them."""
    import json

    from ember.tokenizer import train_tokenizer
    from tests.hf_models import make_hf_model

    root = tmp_path_factory.mktemp("broken")
    tok = train_tokenizer(["hello world, some text to learn from"] * 20, vocab_size=300, show_progress=False)
    out = {}
    for case in ("model_type", "shape", "truncated"):
        folder = root / case
        make_hf_model("llama-linear-rope", folder)
        tok.save(folder)
        out[case] = folder
    cfg = json.loads((out["model_type"] / "config.json").read_text())
    (out["model_type"] / "config.json").write_text(json.dumps({**cfg, "model_type": "bloom"}))
    (out["shape"] / "config.json").write_text(json.dumps({**cfg, "hidden_size": 32}))
    weights = out["truncated"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    return out


@pytest.mark.parametrize("case, needle", [
    ("model_type", "unsupported model_type 'bloom'"),
    ("shape", "has shape"),
    ("truncated", "truncated or corrupt"),
])
def test_broken_checkpoints_are_one_line_errors(case: str, needle: str, broken_models) -> None:
    proc = ember("generate", "--model", str(broken_models[case]), "--prompt", "hi")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and needle in proc.stderr, proc.stderr


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
