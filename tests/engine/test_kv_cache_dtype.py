"""kv_cache_dtype: a 16-bit KV pool under an fp32 model.

The pool holds K and V rounded to fp16 or bf16; attention still computes in fp32. Greedy
outputs must then be the same under every scheduler regime and with or without the native
kernels (every read sees the same rounded values, a fresh prompt's own keys included), and
close to the fp32 cache's; the same memory budget holds twice the tokens.
"""

from __future__ import annotations

import pytest
import torch

from ember.config import preset
from ember.engine import LLM, SamplingParams, native
from ember.engine.config import EngineConfig, EngineConfigError
from tests.engine.conftest import spread_model
from tests.engine.test_engine_parity import NEW, REGIMES, _check_engine, _prompts


@pytest.fixture(scope="module")
def model():
    return spread_model(preset("tiny", vocab_size=512).replace(num_kv_heads=2, max_position_embeddings=256))


def _greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True))
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("kv_dtype", ["float16", "bfloat16"])
def test_16_bit_cache_gives_the_same_tokens_in_every_regime(model, kv_dtype: str, monkeypatch) -> None:
    prompts = _prompts(512)
    llm = LLM(model, kv_cache_dtype=kv_dtype, enable_prefix_caching=False, enable_chunked_prefill=False,
              max_num_batched_tokens=2048)
    assert llm.engine.runner.kv_cache.dtype == getattr(torch, kv_dtype)
    expected = _greedy(llm, prompts)
    for regime in sorted(REGIMES):
        _check_engine(LLM(model, kv_cache_dtype=kv_dtype, **REGIMES[regime]), prompts, expected)
    monkeypatch.setattr(native, "available", lambda: False)  # PyTorch alone reads the same pool
    _check_engine(LLM(model, kv_cache_dtype=kv_dtype, **REGIMES["default"]), prompts, expected)
    _check_engine(LLM(model, kv_cache_dtype=kv_dtype, **REGIMES["preemption"]), prompts, expected)


# Measured on this model (logprobs of magnitude ~4): fp16 max 0.007, median 0.0006; bf16 max
# 0.062, median 0.005 (three fewer significant bits, ~8x the error).
@pytest.mark.parametrize("kv_dtype,tol", [("float16", 0.02), ("bfloat16", 0.15)])
def test_16_bit_cache_is_close_to_fp32_and_holds_twice_the_tokens(model, kv_dtype: str, tol: float) -> None:
    prompts = _prompts(512)
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=5, prompt_logprobs=5)
    full = LLM(model, kv_cache_memory=0.01)
    half = LLM(model, kv_cache_memory=0.01, kv_cache_dtype=kv_dtype)
    assert half.engine.kv.num_blocks // 2 == full.engine.kv.num_blocks  # the same bytes, floored to whole blocks
    worst = 0.0
    for a, b in zip(full.generate(prompts, params), half.generate(prompts, params)):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for pa, pb in zip(a.prompt_logprobs[1:] + a.outputs[0].logprobs, b.prompt_logprobs[1:] + b.outputs[0].logprobs):
            for tid, lp in pa.items():
                if tid in pb:
                    worst = max(worst, abs(lp.logprob - pb[tid].logprob))
    assert 0 < worst < tol  # rounded, but only just


def test_bad_kv_cache_dtype_is_a_clear_error() -> None:
    with pytest.raises(EngineConfigError, match="kv_cache_dtype must be one of auto, float32, float16, bfloat16"):
        EngineConfig(kv_cache_dtype="fp8")
