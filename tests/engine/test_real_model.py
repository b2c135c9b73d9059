"""The real model through every decoder: engine = naive generate = transformers, 32 greedy tokens, 8 prompts.

SmolLM2-135M-Instruct from its GGUF. Tiny random models (std 0.2 weights) make greedy choices
easy; a trained model has near-ties, which is where a kernel's rounding would show. The engine
runs with its native kernels (fast-math build) and, separately, with PyTorch alone.
"""

from __future__ import annotations

import pytest
import torch

import ember
from ember.engine import LLM, SamplingParams, native
from ember.model.generate import generate

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Photosynthesis is the process by which",
    "1, 2, 3, 5, 8, 13,",
    "In Python, a list comprehension",
    "The three primary colors are",
    "Once upon a time, in a small village,",
    "Water boils at",
]
NEW = 32


@pytest.fixture(scope="module")
def prompts_and_reference(smollm2_file, smollm2_hf):
    tok = ember.load_tokenizer(smollm2_file)
    prompts = [tok.encode(p) for p in PROMPTS]
    with torch.no_grad():
        ref = [smollm2_hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                   max_new_tokens=NEW, do_sample=False, eos_token_id=None)[0, len(p):].tolist()
               for p in prompts]
    return prompts, ref


def test_naive_generate_equals_transformers(smollm2, prompts_and_reference) -> None:
    prompts, ref = prompts_and_reference
    for p, exp in zip(prompts, ref):
        assert generate(smollm2, torch.tensor([p]), NEW)[0, len(p):].tolist() == exp


@pytest.mark.parametrize("kernels", ["native", "pytorch"])
def test_engine_equals_transformers(smollm2, smollm2_file, prompts_and_reference, kernels, monkeypatch) -> None:
    if kernels == "native" and not native.available():
        pytest.skip("native kernels unavailable (no C compiler)")
    if kernels == "pytorch":
        monkeypatch.setattr(native, "available", lambda: False)
    prompts, ref = prompts_and_reference
    llm = LLM(smollm2, ember.load_tokenizer(smollm2_file), max_num_seqs=8, kv_cache_memory=0.25)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == ref


def test_chat_answer_is_paris(smollm2, smollm2_file) -> None:
    llm = LLM(smollm2, ember.load_tokenizer(smollm2_file), max_num_seqs=1, kv_cache_memory=0.1)
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=16))
    assert "Paris" in out[0].outputs[0].text


@pytest.mark.parametrize("kernels", ["native", "pytorch"])
def test_engine_on_the_files_own_blocks_equals_transformers(smollm2_file, prompts_and_reference, kernels,
                                                            monkeypatch) -> None:
    """The Q4_1 / Q8_0 blocks run as stored (the default for a GGUF in LLM) give transformers'
    greedy tokens, which it computes from the same blocks dequantized."""
    if kernels == "native" and not native.available():
        pytest.skip("native kernels unavailable (no C compiler)")
    if kernels == "pytorch":
        monkeypatch.setattr(native, "available", lambda: False)
    prompts, ref = prompts_and_reference
    llm = LLM(smollm2_file, max_num_seqs=8, kv_cache_memory=0.25)
    assert type(llm.engine.runner.model.lm_head).__name__ == "GGUFLinear"
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == ref
