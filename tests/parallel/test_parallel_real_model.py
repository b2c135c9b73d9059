"""SmolLM2-135M (the GGUF's Q4_1 / Q8_0 blocks kept, as the engine runs it) split over 2 ranks:
9 query heads over 3 KV heads give ranks 2 and 1 GQA groups, the packed rows and 32-weight
blocks are cut as they are, and greedy tokens are those of one process. A LoRA-wrapped model
splits its adapters with its layers."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

import ember
from ember.adapters.lora import wrap_module
from ember.engine import LLM
from tests.parallel.test_parallel_parity import run_recording

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at", "The three primary colors are"]


def test_smollm2_quantized_blocks_tp2_and_pp2_match_one_process(smollm2_file) -> None:
    tok = ember.load_tokenizer(smollm2_file)
    ids = [tok.encode(p) for p in PROMPTS]
    model = ember.load_model(smollm2_file, keep_quantized=True)
    kw = dict(max_num_seqs=4, kv_cache_memory=0.05)
    ref_tokens, ref_logits = run_recording(LLM(copy.deepcopy(model), **kw), ids)
    for mode in (dict(tensor_parallel_size=2), dict(pipeline_parallel_size=2)):
        with LLM(copy.deepcopy(model), **kw, **mode) as llm:
            tokens, logits = run_recording(llm, ids)
        assert tokens == ref_tokens, mode
        # Row-parallel products sum two partial dot products: fp32 rounding, not the weights, differs.
        for got, want in zip(logits, ref_logits):
            torch.testing.assert_close(got, want, atol=2e-4, rtol=0)


def test_lora_adapters_split_with_their_layers(tmp_path) -> None:
    from tests.hf_models import make_hf_model

    make_hf_model("llama-gqa-llama3-rope", tmp_path)
    model = ember.load_model(tmp_path)
    torch.manual_seed(0)
    for i in range(model.config.num_layers):
        for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"):
            nn.init.normal_(wrap_module(model, f"model.layers.{i}.{name}", r=4, alpha=8).lora_B.weight, std=0.5)
    prompts = [[5, 6, 7, 8], list(range(3, 40))]
    ref_tokens, ref_logits = run_recording(LLM(copy.deepcopy(model)), prompts)
    with LLM(copy.deepcopy(model), tensor_parallel_size=2) as llm:
        tokens, logits = run_recording(llm, prompts)
    assert tokens == ref_tokens
    for got, want in zip(logits, ref_logits):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
