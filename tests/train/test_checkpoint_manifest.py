"""The training checkpoint's manifest (checkpoint.json): every file's sha256 is checked again right
before DCP reads a folder (its .metadata is a pickle), and a mismatch is handled like any corrupt
checkpoint: set aside as *.corrupt, the previous one used. A small module, no training loop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from ember.train import checkpoint as ckpt_mod
from ember.train.checkpoint import MARKER, CorruptCheckpointError, TrainCheckpointError, TrainCheckpoints
from ember.train.distributed import DistInfo

SINGLE = DistInfo(0, 1, 0, torch.device("cpu"))


def model_and_optimizer(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    return model, opt


@pytest.fixture
def saved(tmp_path) -> tuple[TrainCheckpoints, dict[int, nn.Module]]:
    """Checkpoints at steps 1 and 2, each of a different model's weights."""
    ckpts = TrainCheckpoints(tmp_path / "checkpoints", SINGLE, keep_last=3)
    models = {}
    for step in (1, 2):
        model, opt = model_and_optimizer(step)
        ckpts.save(step, model, opt, {"step": step})
        models[step] = model
    return ckpts, models


def same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_the_manifest_lists_every_file_of_the_checkpoint(saved) -> None:
    ckpts, _ = saved
    folder = ckpts.root / "step-00000002"
    files = json.loads((folder / MARKER).read_text())["files"]
    assert ".metadata" in files and any(name.endswith(".distcp") for name in files)
    assert set(files) == {p.name for p in folder.iterdir()} - {MARKER}
    assert ckpts.verify(folder) is None


def test_a_file_changed_after_latest_is_caught_at_load_and_the_previous_one_used(saved, monkeypatch, capsys) -> None:
    ckpts, models = saved
    loaded: list[str] = []
    real_dcp = ckpt_mod._dcp

    def spying_dcp():
        dcp, get, set_ = real_dcp()

        class Spy:
            @staticmethod
            def load(state, checkpoint_id):
                loaded.append(Path(checkpoint_id).name)
                return dcp.load(state, checkpoint_id=checkpoint_id)

        return Spy, get, set_

    monkeypatch.setattr(ckpt_mod, "_dcp", spying_dcp)
    real_latest = ckpts.latest

    def latest_then_tamper():
        # The newest is changed after it was chosen: the window the load-time check closes.
        found = real_latest()
        if found is not None and found.name == "step-00000002":
            (found / ".metadata").write_bytes(b"cos\nsystem\n(S'echo never run'\ntR.")
        return found

    monkeypatch.setattr(ckpts, "latest", latest_then_tamper)
    model, opt = model_and_optimizer(0)
    folder, state = ckpts.restore(model, opt)
    assert folder.name == "step-00000001" and state["step"] == 1 and same(model, models[1])
    assert loaded == ["step-00000001"]  # DCP never read the changed folder
    assert (ckpts.root / "step-00000002.corrupt").is_dir()
    assert "step-00000002 is corrupt (.metadata does not match its checksum)" in capsys.readouterr().out


@pytest.mark.parametrize("change", ["extra_file", "marker_points_outside", "missing_file", "marker_format"])
def test_a_checkpoint_that_does_not_match_its_manifest_is_set_aside(saved, change: str) -> None:
    ckpts, models = saved
    folder = ckpts.root / "step-00000002"
    marker = json.loads((folder / MARKER).read_text())
    if change == "extra_file":
        (folder / "__9_0.distcp").write_bytes(b"never listed")
    elif change == "marker_points_outside":
        (ckpts.root / "elsewhere").write_bytes(b"x")
        marker["files"]["../elsewhere"] = "0" * 64
        (folder / MARKER).write_text(json.dumps(marker))
    elif change == "missing_file":
        (folder / "trainer.json").unlink()
    else:
        marker["format"] = "something-else/9"
        (folder / MARKER).write_text(json.dumps(marker))
    model, opt = model_and_optimizer(0)
    folder_used, _ = ckpts.restore(model, opt)
    assert folder_used.name == "step-00000001" and same(model, models[1])
    assert (ckpts.root / "step-00000002.corrupt").is_dir()


def test_when_every_checkpoint_fails_at_load_the_run_is_not_restarted(saved, monkeypatch) -> None:
    ckpts, _ = saved
    # latest() as it would answer had every folder verified when it looked: each fails at load.
    monkeypatch.setattr(ckpts, "latest", lambda: max(ckpts.root.glob("step-????????"), default=None))
    for folder in ckpts.root.glob("step-*"):
        shard = next(folder.glob("*.distcp"))
        data = bytearray(shard.read_bytes())
        data[-1] ^= 0xFF
        shard.write_bytes(bytes(data))
    model, opt = model_and_optimizer(0)
    with pytest.raises(TrainCheckpointError, match="no usable checkpoint .* every one is corrupt"):
        ckpts.restore(model, opt)
    assert sorted(p.name for p in ckpts.root.iterdir()) == ["step-00000001.corrupt", "step-00000002.corrupt"]


def test_load_model_only_checks_the_manifest_too(saved) -> None:
    ckpts, _ = saved
    folder = ckpts.root / "step-00000002"
    (folder / "trainer.json").write_text("{}")
    model, _ = model_and_optimizer(0)
    with pytest.raises(CorruptCheckpointError, match="trainer.json does not match its checksum"):
        ckpts.load_model_only(folder, model)
    assert (ckpts.root / "step-00000002.corrupt").is_dir()
