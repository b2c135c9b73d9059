"""`ember pretrain`: every YAML preset loads and runs, and bad input is one clear error each."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ember import save_model
from ember.cliconfig import parse_config
from ember.config import PRESETS, preset
from ember.data.sources import DataSourceError
from ember.model.transformer import Transformer
from ember.train.checkpoint import TrainCheckpointError
from ember.train.pretrain import PretrainConfig, PretrainError, pretrain
from tests.train.tinyrun import ONE_THREAD, PEAK

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("pretrain-*.yaml"))


def test_there_are_pretrain_presets() -> None:
    assert {p.stem for p in CONFIGS} >= {"pretrain-quickstart", "pretrain-10m", "pretrain-bench"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_preset_loads_and_trains(path: Path, textdata, tmp_path) -> None:
    cfg = parse_config(PretrainConfig, ["--config", str(path)], "ember pretrain")
    assert cfg.model in PRESETS and cfg.max_steps > 0 and cfg.data
    # Everything but the size of the run as the preset says; tiny model and data to run it here.
    run = parse_config(PretrainConfig, ["--config", str(path), "--model", "tiny", "--tokenizer", str(textdata["tok"]),
                                        "--data", str(textdata["prose"]), "--data-dir", str(textdata["data"]),
                                        "--out", str(tmp_path), "--max-steps", "2", "--seq-len", "32",
                                        "--no-progress"], "ember pretrain")
    result = pretrain(run, peak_flops=PEAK)
    assert result.train.step == 2 and (tmp_path / "model" / "config.json").exists()


def test_vocab_model_mismatch(textdata, tmp_path, make_config) -> None:
    small = Transformer(preset("tiny", vocab_size=256))
    save_model(small, tmp_path / "m")
    with pytest.raises(PretrainError, match="tokenizer has 512 tokens but the model's embedding has only 256"):
        pretrain(make_config(tmp_path / "run", model=str(tmp_path / "m")), peak_flops=PEAK)


@pytest.mark.parametrize("data, needle", [(["/no/such/folder"], "does not exist"), (["EMPTY"], "no text found")])
def test_missing_or_empty_data(data, needle, make_config, tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    data = [str(tmp_path / "empty") if d == "EMPTY" else d for d in data]
    with pytest.raises(DataSourceError, match=needle):
        pretrain(make_config(tmp_path / "run", data=data, data_dir=tmp_path / "shards"), peak_flops=PEAK)


def test_checkpoint_of_another_model_is_a_clear_error(make_config, tmp_path) -> None:
    pretrain(make_config(tmp_path, max_steps=2), peak_flops=PEAK)
    with pytest.raises(TrainCheckpointError, match="does not fit this model"):
        pretrain(make_config(tmp_path, max_steps=4, model="tiny-moe"), peak_flops=PEAK)
    assert (tmp_path / "checkpoints" / "step-00000002").is_dir()  # the run is left as it was


@pytest.mark.parametrize("args, needle", [
    (["--model", "tiny"], "also pass --tokenizer"),
    (["--model", "no-such-model"], "neither a preset"),
    (["--model", "tiny", "--tokenizer", "TOK", "--data", "/no/such/dir"], "does not exist"),
    (["--model", "tiny", "--tokenizer", "TOK", "--batch-size", "3"], "multiple of micro_batch_size"),
])
def test_cli_errors_are_one_line(args, needle, textdata, tmp_path) -> None:
    args = [str(textdata["tok"]) if a == "TOK" else a for a in args]
    proc = subprocess.run([sys.executable, "-m", "ember", "pretrain", "--out", str(tmp_path), *args],
                          capture_output=True, text=True, timeout=300, env=ONE_THREAD)
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and " INFO " not in ln]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
