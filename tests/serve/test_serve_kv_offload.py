"""`ember serve --kv-offload-gb`: a returning prompt served from the offload tier over HTTP (the
official openai client), the tier's Prometheus counters, and the flags' one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pydoc_data.topics import topics

import openai

from ember.serve import running
from tests.serve.conftest import make_app, metric


def _ask(url: str, prompt: str) -> str:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    return client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0).choices[0].text


def test_a_returning_prompt_comes_back_from_the_tier(tiny_dir) -> None:
    a, b = topics["if"][:200], topics["while"][:200]
    # 8 blocks x 16 tokens: B's blocks evict A's from the pool between A's two visits.
    plain = make_app(tiny_dir, num_kv_blocks=8, block_size=16)
    tiered = make_app(tiny_dir, num_kv_blocks=8, block_size=16, kv_offload_gb=0.01)
    with running(plain) as url:
        expected = [_ask(url, p) for p in (a, b, a)]
        assert metric(url, "ember:kv_offload_restored_blocks_total") == 0  # no tier, no such metric
    with running(tiered) as url:
        assert [_ask(url, p) for p in (a, b, a)] == expected
        assert metric(url, "ember:kv_offload_restored_blocks_total", kind="prefix") > 0
        assert metric(url, "ember:kv_offload_stored_blocks_total", kind="prefix") > 0
        assert metric(url, "ember:kv_offload_restored_blocks_total", kind="swap") == 0
        assert metric(url, "ember:kv_offload_usage_perc") > 0
        assert metric(url, "ember:kv_offload_dropped_blocks_total") == 0
        assert metric(url, "ember:kv_offload_swapped_sequences_total") == 0


def _serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ember", "serve", *args], check=False, capture_output=True,
                          text=True, timeout=120)


def test_offload_flags_fail_in_one_line(tiny_dir, tmp_path) -> None:
    for args, needle in [(["--kv-offload-gb", "0.01", "--kv-offload-dir", "/proc"],
                          "cannot create the KV offload file in '/proc'"),
                         (["--kv-offload-gb", "0.01", "--kv-offload-dir", str(tmp_path / "nope")], "is not a directory"),
                         (["--kv-offload-dir", str(tmp_path)], "kv_offload_gb is 0")]:
        proc = _serve("--model", str(tiny_dir), *args)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert needle in lines[-1]
        assert sum("error" in ln.lower() or needle in ln for ln in lines) == 1, proc.stderr
