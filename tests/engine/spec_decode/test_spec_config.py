"""--speculative-config: vLLM's JSON shape accepted, every mistake one line naming the field."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ember.engine.config import EngineConfig
from ember.engine.spec_decode import SpeculativeConfig, SpeculativeConfigError


def test_vllm_shapes_parse() -> None:
    ng = SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 5, '
                                 '"prompt_lookup_min": 1}')
    assert (ng.method, ng.num_speculative_tokens, ng.prompt_lookup_max, ng.prompt_lookup_min) == ("ngram", 3, 5, 1)
    assert SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 2}).prompt_lookup_min == 2
    assert SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 2,
                                    "prompt_lookup_max": 1}).prompt_lookup_min == 1
    dm = SpeculativeConfig.parse({"method": "draft_model", "model": "some/dir", "num_speculative_tokens": 4})
    assert (dm.method, dm.model, dm.num_speculative_tokens) == ("draft_model", "some/dir", 4)
    assert SpeculativeConfig.parse(None) is None and SpeculativeConfig.parse("  ") is None


@pytest.mark.parametrize("value, words", [
    ("{", "not JSON"),
    ("[1]", "must be a JSON object"),
    ({"method": "eagle", "num_speculative_tokens": 2}, "method must be one of"),
    ({"method": "ngram"}, "num_speculative_tokens is required"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be an integer in [1, 32]"),
    ({"method": "ngram", "num_speculative_tokens": "4"}, "num_speculative_tokens must be an integer"),
    ({"method": "ngram", "num_speculative_tokens": True}, "num_speculative_tokens must be an integer"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 5, "prompt_lookup_max": 3},
     "prompt_lookup_min (5) must be <= prompt_lookup_max (3)"),
    ({"method": "ngram", "num_speculative_tokens": 2, "model": "x"}, "unknown key(s) model"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "needs \"model\""),
    ({"method": "draft_model", "model": "x", "num_speculative_tokens": 2, "prompt_lookup_max": 3},
     "unknown key(s) prompt_lookup_max"),
])
def test_mistakes_are_one_line(value, words) -> None:
    with pytest.raises(SpeculativeConfigError) as e:
        SpeculativeConfig.parse(value)
    assert words in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(SpeculativeConfigError):  # the engine config checks it too, before any model loads
        EngineConfig(speculative_config=value)


def test_cli_refuses_a_bad_config_in_one_line(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "ember", "serve", "--model", str(tmp_path),
                           "--speculative-config", '{"method": "ngram"}'], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "num_speculative_tokens is required" in lines[0], proc.stderr
