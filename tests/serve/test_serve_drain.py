"""`ember serve` as a process: SIGTERM lets the requests in flight finish (no new connections),
the drain is bounded by --drain-timeout, and the process exits 0."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(model_dir, *flags: str, kv_blocks: int = 256) -> tuple[subprocess.Popen, str]:
    """`ember serve` in a subprocess on a free port, once /health answers (also tests/parallel's)."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ember", "serve", "--model", str(model_dir), "--port", str(port),
                             "--num-kv-blocks", str(kv_blocks), "--threads", "1", "--log-interval", "0", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "ember serve did not start"
        time.sleep(0.1)


def test_sigterm_drains_the_stream_in_flight(tiny_dir) -> None:
    proc, url = _start(tiny_dir, "--drain-timeout", "60", "--max-num-seqs", "1")
    events: list[str] = []
    first = threading.Event()

    def stream() -> None:
        body = {"prompt": "Drain me", "max_tokens": 480, "ignore_eos": True, "n": 4, "stream": True,
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    first.set()

    reader = threading.Thread(target=stream)
    reader.start()
    try:
        assert first.wait(60)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.TransportError):  # no new connections while draining
            httpx.get(url + "/health", timeout=5)
        reader.join(120)
        assert proc.wait(60) == 0
    finally:
        proc.kill()
    log = proc.stdout.read()
    assert events[-1] == "[DONE]" and '"completion_tokens":1920' in events[-2], (events[-3:], log[-2000:])
    assert "draining" in log


def test_drain_is_bounded_by_the_timeout(tiny_dir) -> None:
    proc, url = _start(tiny_dir, "--drain-timeout", "1")
    host, port = url.removeprefix("http://").split(":")
    try:
        with socket.create_connection((host, int(port))) as s:  # a request whose body never comes
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"pro")
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0  # gave up on it after --drain-timeout instead of waiting forever
    finally:
        proc.kill()
    assert "timeout graceful shutdown exceeded" in proc.stdout.read()


@pytest.mark.parametrize("args, needle", [
    (["--model", "/no/such/model"], "does not exist"),
    (["--model", ".", "--port", "70000"], "--port"),
    (["--model", ".", "--max-num-seqs", "0"], "max_num_seqs"),
])
def test_config_errors_are_one_line(args, needle, tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "ember", "serve", *args], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
