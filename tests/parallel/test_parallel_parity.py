"""Tensor, pipeline and expert parallel engines give what one process gives: the same greedy tokens
and logits within 1e-5, for 16 prompts on tiny llama (GQA), qwen2 (biases, tied head) and mixtral
models (and Falcon's multi-query parallel block, whose one KV head each rank copies), with
prefix caching, chunked prefill and preemption all on. Each parallel engine is 2
processes (gloo, one thread each; TP x PP: 4) spawned by ember, compared step by step with a
one-process engine on a copy of the same model.
"""

from __future__ import annotations

import copy

import pytest
import torch

import ember
from ember.engine import LLM, SamplingParams
from tests.hf_models import make_hf_model

LENGTHS = [1, 3, 7, 15, 16, 17, 23, 31, 32, 33, 40, 47, 55, 64, 70, 90]
NEW = 16
# Chunks of 32 tokens; 20 blocks x 8 = 160 slots while the 16 requests need ~900 together.
REGIME = dict(enable_prefix_caching=True, enable_chunked_prefill=True, max_num_batched_tokens=32,
              max_num_seqs=16, num_kv_blocks=20, block_size=8)
MODES = {
    "tp2": dict(tensor_parallel_size=2),
    "pp2": dict(pipeline_parallel_size=2),
    "ep2": dict(tensor_parallel_size=2, enable_expert_parallel=True),
    "tp2xpp2": dict(tensor_parallel_size=2, pipeline_parallel_size=2),
}
CASES = [("llama-gqa-llama3-rope", "tp2"), ("llama-gqa-llama3-rope", "pp2"), ("llama-gqa-llama3-rope", "tp2xpp2"),
         ("qwen2-bias-tied", "tp2"), ("qwen2-bias-tied", "pp2"),
         ("mixtral-4x2", "tp2"), ("mixtral-4x2", "pp2"), ("mixtral-4x2", "ep2"),
         # one KV head (MQA) over 2 ranks: each keeps a copy; Falcon's parallel block and biases
         ("falcon-mqa-parallel", "tp2")]


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    shared = torch.randint(3, vocab, (40,), generator=g).tolist()
    return [(shared + torch.randint(3, vocab, (n,), generator=g).tolist())[:n] if i % 2
            else torch.randint(3, vocab, (n,), generator=g).tolist() for i, n in enumerate(LENGTHS)]


def run_recording(llm: LLM, prompts: list[list[int]]) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy tokens of every prompt, and the logits of every step (rank 0's)."""
    steps: list[torch.Tensor] = []
    runner = llm.engine.runner
    run = runner.run

    def recording(step):
        logits = run(step)
        if logits is not None:
            steps.append(logits.clone())
        return logits

    runner.run = recording
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True))
    return [o.outputs[0].token_ids for o in outs], steps


_REFERENCES: dict[str, tuple] = {}


def reference(family: str, tmp_path_factory) -> tuple:
    """(model, prompts, tokens, step logits, engine stats) of the one-process engine, once per family."""
    if family not in _REFERENCES:
        path = tmp_path_factory.mktemp(family)
        make_hf_model(family, path)
        model = ember.load_model(path)
        prompts = _prompts(model.config.vocab_size)
        llm = LLM(copy.deepcopy(model), **REGIME)
        tokens, logits = run_recording(llm, prompts)
        _REFERENCES[family] = (model, prompts, tokens, logits, llm.engine.stats())
    return _REFERENCES[family]


@pytest.mark.parametrize("family,mode", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_parallel_matches_one_process(family: str, mode: str, tmp_path_factory) -> None:
    model, prompts, ref_tokens, ref_logits, ref_stats = reference(family, tmp_path_factory)
    assert ref_stats.num_preemptions > 0 and ref_stats.prefix_cache_hits > 0  # the regime is exercised
    with LLM(copy.deepcopy(model), **REGIME, **MODES[mode]) as llm:
        tokens, logits = run_recording(llm, prompts)
        stats = llm.engine.stats()
        kv = llm.engine.kv
        assert kv.num_free_blocks == kv.num_blocks and not kv.tables
    assert tokens == ref_tokens
    assert (stats.num_preemptions, stats.prefix_cache_hits) == (ref_stats.num_preemptions, ref_stats.prefix_cache_hits)
    assert len(logits) == len(ref_logits)
    for got, want in zip(logits, ref_logits):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
