"""torchrun with 2 CPU processes (gloo): DDP matches one process, FSDP2 trains and reloads in one."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import ember
from ember.config import preset
from ember.model.transformer import Transformer
from ember.train.checkpoint import TrainCheckpoints
from ember.train.distributed import DistInfo
from ember.train.pretrain import pretrain
from tests.train.tinyrun import ONE_THREAD, PEAK, cli_args, losses

pytestmark = pytest.mark.slow


def torchrun(cfg, parallel: str) -> subprocess.CompletedProcess:
    cfg.parallel = parallel
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "ember", *cli_args(cfg)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, env=ONE_THREAD)
    if proc.returncode != 0:  # each rank's own error lines first, then the tail
        text = proc.stdout + proc.stderr
        telling = [ln for ln in text.splitlines() if any(w in ln for w in ("Error", "error", "terminate", "what()"))]
        raise AssertionError("\n".join(telling[:40]) + "\n...\n" + text[-2000:])
    return proc


def test_ddp_two_processes_match_one_process(make_config, tmp_path) -> None:
    single = pretrain(make_config(tmp_path / "one", max_steps=6), peak_flops=PEAK)  # accumulates 2 micro-batches
    torchrun(make_config(tmp_path / "ddp", max_steps=6), "ddp")  # 2 ranks x 1 micro-batch each
    a, b = losses(tmp_path / "one"), losses(tmp_path / "ddp")
    assert a.keys() == b.keys() and len([k for k in a if isinstance(k, int)]) == 6
    for k in a:
        va, vb = (a[k][0], b[k][0]) if isinstance(k, int) else (a[k], b[k])
        assert abs(va - vb) < 1e-5, (k, va, vb)
    wa = load_file(str(single.model_dir / "model.safetensors"))
    wb = load_file(str(tmp_path / "ddp" / "model" / "model.safetensors"))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5


def test_fsdp_trains_and_its_checkpoint_reloads_in_one_process(make_config, tmp_path) -> None:
    cfg = make_config(tmp_path / "fsdp", max_steps=6, save_every=3)
    torchrun(cfg, "fsdp")
    steps = losses(cfg.out)
    assert steps[6][0] < steps[1][0]  # it learned
    # The sharded (DCP) checkpoint loads into a plain single-process model and equals the
    # exported Hugging Face model.
    exported = ember.load_model(cfg.out / "model")
    plain = Transformer(exported.config)
    ckpts = TrainCheckpoints(cfg.out / "checkpoints", DistInfo(0, 1, 0, torch.device("cpu")))
    ckpts.load_model_only(ckpts.latest(), plain)
    for k, v in exported.state_dict().items():
        assert torch.equal(plain.state_dict()[k], v), k
    assert plain.config == exported.config and plain.config.vocab_size == preset("tiny").vocab_size
    # A single process resumes the FSDP run's step-3 checkpoint (model, optimizer, data position)
    # and reproduces its later losses.
    resumed = make_config(tmp_path / "single", max_steps=6, save_every=3)
    (resumed.out / "checkpoints").mkdir(parents=True)
    src = cfg.out / "checkpoints" / "step-00000003"
    shutil.copytree(src, resumed.out / "checkpoints" / src.name)
    pretrain(resumed, peak_flops=PEAK)
    mine = losses(resumed.out)
    for step in (4, 5, 6):
        assert abs(mine[step][0] - steps[step][0]) < 1e-5, (step, mine[step], steps[step])
