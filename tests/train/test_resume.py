"""Exact resume: a run stopped at any step (even by SIGKILL) and resumed matches an uninterrupted one."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest

from ember.train.pretrain import pretrain
from tests.train.tinyrun import ONE_THREAD, PEAK, cli_args, losses, same_weights, tiny_config

@pytest.fixture(scope="module")
def reference(textdata, tmp_path_factory):
    """The uninterrupted 8-step run."""
    out = tmp_path_factory.mktemp("ref")
    result = pretrain(tiny_config(textdata, out), peak_flops=PEAK)
    return out, result


def test_stop_and_resume_is_bitwise_identical(reference, make_config, tmp_path) -> None:
    ref_out, ref = reference
    cfg = make_config(tmp_path)
    partial = pretrain(cfg, peak_flops=PEAK, stop_at=5)
    assert partial.train.step == 5 and partial.model_dir is None
    shutil.rmtree(tmp_path / "checkpoints" / "step-00000005")  # lose steps 4-5: resume from step 3
    result = pretrain(cfg, peak_flops=PEAK)
    assert result.train.step == 8
    assert losses(tmp_path) == losses(ref_out)  # train loss, grad norm, lr and val loss, bitwise
    assert same_weights(result.model_dir, ref.model_dir)
    assert result.ppl_before == ref.ppl_before and result.ppl_after == ref.ppl_after


def test_corrupt_latest_checkpoint_falls_back_and_is_kept(reference, make_config, tmp_path, capsys) -> None:
    ref_out, _ = reference
    cfg = make_config(tmp_path, max_steps=8, save_every=3)
    pretrain(cfg, peak_flops=PEAK)
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000003", "step-00000006", "step-00000008"]
    shard = next((ckpts / "step-00000008").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    (ckpts / "step-00000009").mkdir()  # a folder that never got its completion marker
    (ckpts / "step-00000009" / "__0_0.distcp").write_bytes(b"partial")
    (ckpts / ".step-00000010.tmp").mkdir()  # a save that was killed half-way
    result = pretrain(cfg, peak_flops=PEAK)  # same command again: resumes from step 6
    out = capsys.readouterr().out
    assert "step-00000008 is corrupt" in out and "resumed from" in out and "step-00000006" in out
    assert (ckpts / "step-00000008.corrupt").is_dir()  # kept for inspection, never deleted
    assert (ckpts / "step-00000009.corrupt").is_dir() and not (ckpts / ".step-00000010.tmp").exists()
    assert (ckpts / "step-00000006").is_dir()
    assert result.train.step == 8 and losses(tmp_path) == losses(ref_out)


def test_sigkill_between_checkpoints_then_resume_matches(reference, make_config, tmp_path) -> None:
    """Kill -9 a CLI run mid-way, rerun the same command, compare to the uninterrupted run."""
    ref_out, ref = reference
    cfg = make_config(tmp_path)
    args = [sys.executable, "-m", "ember", *cli_args(cfg)]
    # The killed run's steps are slowed down (in that process only) so the kill lands mid-run.
    slow = ("import sys, time, ember.train.loop as L; step = L.Trainer.train_step; "
            "L.Trainer.train_step = lambda self: (time.sleep(0.3), step(self))[1]; "
            "from ember.__main__ import main; main(sys.argv[1:])")
    proc = subprocess.Popen([sys.executable, "-c", slow, *args[3:]], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=ONE_THREAD)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            done = [json.loads(x)["step"] for x in metrics.read_text().splitlines()] if metrics.exists() else []
            if max(done, default=0) >= 5 and (tmp_path / "checkpoints" / "step-00000003").exists():
                break
            assert proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not (tmp_path / "model").exists()  # it really died before the end
    rerun = subprocess.run(args, capture_output=True, text=True, timeout=600, env=ONE_THREAD)
    assert rerun.returncode == 0, rerun.stderr
    assert "resumed from" in rerun.stdout
    assert losses(tmp_path) == losses(ref_out)
    assert same_weights(tmp_path / "model", ref.model_dir)
