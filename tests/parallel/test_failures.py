"""A parallel engine that loses a rank fails with one clear line and exits non-zero, never
hangs: the offline LLM raises, a worker whose rank 0 is gone exits, `ember serve` goes down with
status 1; SIGTERM drains a parallel server like a one-process one and its workers exit with it.
Shapes that cannot be split are refused before anything runs, the workers cleaned up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import ember
from ember.engine import LLM, SamplingParams
from ember.parallel import ParallelError
from tests.hf_models import make_hf_model
from tests.serve.test_serve_drain import _start

GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_hf_model("llama-gqa-llama3-rope", path)
    return path


def _gone(pid: int, within: float) -> bool:
    """Whether process `pid` exits (or is a zombie) within `within` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def test_dead_worker_fails_the_engine_with_one_line(llama) -> None:
    llm = LLM(ember.load_model(llama), tensor_parallel_size=2, distributed_timeout=20)
    assert llm.generate([[5, 6, 7]], GREEDY)[0].outputs[0].token_ids
    worker = llm.engine.runner.group.procs[0]
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(10)
    start = time.monotonic()
    with pytest.raises(ParallelError, match=rf"parallel worker rank 1 \(pid {worker.pid}\) exited with code -9"):
        llm.generate([[5, 6, 7]], GREEDY)
    assert time.monotonic() - start < 15  # not the collective's timeout
    llm.close()


def test_worker_exits_when_rank0_dies(llama, tmp_path) -> None:
    script = tmp_path / "rank0.py"
    script.write_text(
        "import os, sys\nimport ember\nfrom ember.engine import LLM\n"
        "if __name__ == '__main__':\n"
        f"    llm = LLM(ember.load_model({str(llama)!r}), tensor_parallel_size=2, distributed_timeout=60)\n"
        "    print(llm.engine.runner.group.procs[0].pid, flush=True)\n"
        "    os._exit(3)\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(ember.__file__).parents[1])})
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert _gone(int(proc.stdout.split()[0]), within=30), "the worker outlived its rank 0"


def test_a_script_that_never_closes_exits_promptly(llama, tmp_path) -> None:
    script = tmp_path / "forgets.py"
    script.write_text(
        "import ember\nfrom ember.engine import LLM, SamplingParams\n"
        "if __name__ == '__main__':\n"
        f"    llm = LLM(ember.load_model({str(llama)!r}), tensor_parallel_size=2)\n"
        "    print(llm.generate([[5, 6]], SamplingParams(max_tokens=2))[0].outputs[0].token_ids)\n")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(ember.__file__).parents[1])})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert time.monotonic() - start < 60  # not the workers' 120 s collective timeout


def test_unsplittable_shape_is_refused_and_workers_cleaned_up(llama) -> None:
    model = ember.load_model(llama)  # 4 query heads reading 2 KV heads
    with pytest.raises(ParallelError, match="multiple of the KV heads"):
        LLM(model, tensor_parallel_size=3)
    import torch.distributed as dist

    assert not dist.is_initialized()


def _serve(model_dir: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    return _start(model_dir, "--tensor-parallel-size", "2", *flags, kv_blocks=64)


def test_dead_worker_takes_the_server_down(tiny_dir) -> None:
    proc, url = _serve(tiny_dir)
    try:
        r = httpx.post(url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 4}, timeout=60)
        assert r.status_code == 200
        workers = [p for p in _children(proc.pid) if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text()]
        assert workers
        os.kill(workers[0], signal.SIGKILL)
        assert proc.wait(60) == 1  # idle when the worker died: the watchdog noticed
    finally:
        proc.kill()
    log = proc.stdout.read()
    assert "the server stopped: parallel worker rank 1" in log and "exited with code -9" in log, log[-2000:]
    assert "Traceback" not in log


def test_sigterm_drains_and_stops_the_workers(tiny_dir) -> None:
    proc, url = _serve(tiny_dir)
    try:
        workers = [p for p in _children(proc.pid) if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text()]
        assert len(workers) == 1
        r = httpx.post(url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 4}, timeout=60)
        assert r.status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        proc.kill()
    assert all(_gone(p, within=30) for p in workers)
