"""Joined under torchrun instead of spawned: `torchrun --nproc-per-node 2 -m ember generate
--tensor-parallel-size 2` prints what one process prints; rank 1 serves rank 0's steps and
exits 0 with it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def _generate(model_dir: Path, *launcher: str, tp: int) -> subprocess.CompletedProcess:
    cmd = [*launcher, "-m", "ember", "generate", "--model", str(model_dir), "--prompt", "def f(x):",
           "--max-tokens", "12", "--tensor-parallel-size", str(tp)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})


def test_torchrun_ranks_generate_what_one_process_does(tiny_dir) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun is not installed beside this Python")
    one = _generate(tiny_dir, sys.executable, tp=1)
    two = _generate(tiny_dir, torchrun, "--nproc-per-node", "2", tp=2)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert one.stdout.strip() and two.stdout.strip() == one.stdout.strip()  # rank 1 prints nothing
