"""Greedy engine outputs are token-identical to naive generate and to transformers' generate.

16 prompts of different lengths go in together, under every scheduler regime: prefix caching
on/off, chunked prefill on/off, and a pool too small for all requests at once (preemption);
with the native CPU kernels and with PyTorch alone. After each run the pool is whole again.
"""

from __future__ import annotations

import pytest
import torch

import ember
from ember.engine import LLM, SamplingParams, native
from ember.model.generate import generate
from tests.hf_models import make_hf_model

LENGTHS = [1, 3, 7, 15, 16, 17, 23, 31, 32, 33, 40, 47, 55, 64, 70, 90]
NEW = 32
REGIMES = {
    "default": dict(),
    "no-prefix-cache": dict(enable_prefix_caching=False),
    "no-chunked-prefill": dict(enable_chunked_prefill=False, max_num_batched_tokens=256),
    "small-chunks": dict(max_num_batched_tokens=32, max_num_seqs=16),
    # 16 blocks x 8 tokens = 128 slots (the longest request, 90 + 32 tokens, fits), while the 16 need ~1,100 together
    "preemption": dict(num_kv_blocks=16, block_size=8, max_num_batched_tokens=48, max_num_seqs=16),
}


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    shared = torch.randint(3, vocab, (40,), generator=g).tolist()
    prompts = []
    for i, n in enumerate(LENGTHS):
        own = torch.randint(3, vocab, (n,), generator=g).tolist()
        # Every other prompt starts with a shared prefix so the prefix cache gets hits.
        prompts.append((shared + own)[:max(n, 1)] if i % 2 else own)
    return prompts


def _check_engine(llm: LLM, prompts: list[list[int]], expected: list[list[int]]) -> None:
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True))
    for prompt, out, exp in zip(prompts, outs, expected):
        assert out.prompt_token_ids == prompt
        assert out.outputs[0].token_ids == exp, f"prompt of {len(prompt)} tokens diverged"
        assert out.outputs[0].finish_reason == "length"
    kv = llm.engine.kv
    kv.check_invariants()
    assert kv.num_free_blocks == kv.num_blocks and not kv.tables
    assert all(c == 0 for c in kv.ref_cnt)


@pytest.fixture(scope="module", params=["llama-gqa-llama3-rope", "mixtral-4x2", "mistral-sliding-window",
                                               "falcon-mqa-parallel", "falcon-new-arch-gqa", "falcon-rw-alibi",
                                               "gemma3-interleaved", "gemma3-mqa-softcap"])
def hf_case(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = make_hf_model(request.param, path)
    model = ember.load_model(path)
    prompts = _prompts(128)
    with torch.no_grad():
        ref = [hf.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    naive = [generate(model, torch.tensor([p]), NEW)[0, len(p):].tolist() for p in prompts]
    assert naive == ref  # the two references agree before the engine is compared with them
    return model, prompts, ref


@pytest.mark.parametrize("regime", sorted(REGIMES))
def test_greedy_matches_transformers_and_naive(hf_case, regime: str) -> None:
    model, prompts, ref = hf_case
    llm = LLM(model, **REGIMES[regime])
    _check_engine(llm, prompts, ref)
    if regime == "preemption":
        assert llm.engine.scheduler.num_preemptions > 0
    if regime == "small-chunks":  # the shared prefix is computed in an early step, then found
        assert llm.engine.kv.prefix_hits > 0


@pytest.mark.parametrize("regime", ["default", "preemption"])
def test_greedy_matches_with_pytorch_kernels_only(hf_case, regime: str, monkeypatch) -> None:
    """The same outputs when the native CPU kernels are unavailable (no C compiler)."""
    monkeypatch.setattr(native, "available", lambda: False)
    model, prompts, ref = hf_case
    _check_engine(LLM(model, **REGIMES[regime]), prompts, ref)


@pytest.mark.parametrize("changes", [dict(position="alibi"), dict(position="alibi", sliding_window=6),
                                     dict(sliding_window=5, sliding_window_start_layer=1)])
def test_alibi_and_windows_match_naive(changes) -> None:
    torch.manual_seed(0)
    model = ember.Transformer(ember.preset("tiny").replace(**changes)).eval()
    for p in model.parameters():  # spread logits so greedy is not decided by rounding
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.2)
    prompts = _prompts(512)
    expected = [generate(model, torch.tensor([p]), NEW)[0, len(p):].tolist() for p in prompts]
    for regime in ("default", "preemption"):
        _check_engine(LLM(model, **REGIMES[regime]), prompts, expected)
