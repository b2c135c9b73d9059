"""`ember quickstart --real-model gemma3-270m`: the real-model stages on the second real model.

Only the stages that meet the real model alone run here (chat, and quantize in --fast mode); the
whole run with SmolLM2 is tests/test_quickstart.py. Skipped where Gemma 3 270M is not installed.
"""

from __future__ import annotations

import pytest

from ember.checkpoint.registry import ModelNotFoundError
from ember.commands.chat import stage_real_chat
from ember.commands.quantize import stage_real_quantize
from ember.commands.quickstart import QuickstartConfig, QuickstartState, main


def test_real_model_stages_take_gemma3(gemma3_file, tmp_path, capsys) -> None:
    state = QuickstartState(QuickstartConfig(out=tmp_path, fast=True, real_model="gemma3-270m"))
    stage_real_chat(state)
    out = capsys.readouterr().out
    assert "base model" in out and "Paris" in out
    stage_real_quantize(state)
    assert set(state.perplexity) == {"gemma3-270m fp32", "gemma3-270m rtn-4b-g64"}
    fp32, rtn = (state.perplexity[f"gemma3-270m {r}"].result.bits_per_byte for r in ("fp32", "rtn-4b-g64"))
    assert fp32 < rtn < 1.5 * fp32


def test_unknown_real_model_is_one_clear_error(tmp_path) -> None:
    with pytest.raises(ModelNotFoundError, match="unknown --real-model 'nope'; choose one of"):
        main(QuickstartConfig(out=tmp_path, real_model="nope"))
