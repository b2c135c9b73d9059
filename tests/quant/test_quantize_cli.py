"""`ember quantize` and `ember export` end to end on a tiny model, their presets, and user errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ember
from ember.cliconfig import parse_config
from ember.commands.quantize import QuantizeConfig
from ember.config import preset
from ember.data.sources import pydoc_topics
from ember.model.transformer import Transformer
from ember.tokenizer import train_tokenizer

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def ember_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ember", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    tok = train_tokenizer((d.text for d in list(pydoc_topics())[:40]), vocab_size=512, show_progress=False)
    torch.manual_seed(0)
    ember.save_model(Transformer(preset("tiny", vocab_size=tok.vocab_size, eos_token_id=tok.eos_token_id)), folder)
    tok.save(folder)
    return folder


@pytest.mark.slow
def test_quantize_prints_the_table_and_saves_a_loadable_model(tiny_dir, tmp_path) -> None:
    out = tmp_path / "q"
    proc = ember_cli("quantize", "--model", str(tiny_dir), "--out", str(out), "--method", "gptq", "--bits", "4",
                     "--group-size", "32", "--calib-samples", "4", "--calib-seq-len", "64",
                     "--eval-tokens", "1500", "--eval-seq-len", "128", "--decode-tokens", "4")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:3] == ["method", "bits/w", "MB"] and "Δppl" in lines[0]
    fp32 = next(ln for ln in lines if ln.startswith("fp32"))
    gptq = next(ln for ln in lines if ln.startswith("gptq-4b-g32"))
    assert float(fp32.split()[1]) == 32.0 and 4.0 < float(gptq.split()[1]) < 6.0
    assert gptq.split()[6].endswith("%")
    model = ember.load_model(out)
    assert model.quantization_config["quant_method"] == "gptq"
    assert ember.load_tokenizer(out).vocab_size == model.config.vocab_size


def test_export_gguf_cli(tiny_dir, tmp_path) -> None:
    out = tmp_path / "m.gguf"
    proc = ember_cli("export", "--format", "gguf", "--type", "q8_0", "--model", str(tiny_dir), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.exists() and "q8_0" in proc.stdout


@pytest.mark.parametrize("args, needle", [
    (["quantize", "--model", "/no/such/dir", "--out", "x"], "does not exist"),
    (["quantize", "--model", "{tiny}", "--out", "{tmp}/x", "--method", "rtn", "--bits", "5"], "--bits must be"),
    (["quantize", "--model", "{tiny}", "--out", "{tmp}/x", "--method", "gptq", "--calib-data", "/no/file.txt"],
     "does not exist"),
    (["export", "--model", "{moe}", "--out", "{tmp}/x.gguf"], "dense Llama-block RoPE"),
])
def test_user_errors_are_one_line(tiny_dir, tmp_path, args: list[str], needle: str) -> None:
    moe = tmp_path / "moe"
    if "{moe}" in args:
        ember.save_model(Transformer(preset("tiny-moe", vocab_size=512)), moe)
        ember.load_tokenizer(tiny_dir).save(moe)
    proc = ember_cli(*[a.format(tiny=tiny_dir, tmp=tmp_path, moe=moe) for a in args])
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "usage:" not in ln]
    assert len(lines) == 1 and needle in lines[0], proc.stderr


@pytest.mark.parametrize("preset_file", sorted(CONFIGS.glob("quantize-*.yaml")))
def test_quantize_presets_load(preset_file: Path) -> None:
    cfg = parse_config(QuantizeConfig, ["--config", str(preset_file), "--model", "m", "--out", "o"], "ember quantize")
    assert cfg.method in ("gptq", "awq") and cfg.bits == 4 and cfg.group_size == 128
