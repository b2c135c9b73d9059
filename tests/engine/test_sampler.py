"""The sampler's filters and penalties against transformers' logits processors and direct
computations on fixed logits; the exponential-race draw against the softmax distribution."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from ember.engine.request import Request
from ember.engine.sampler import Sampler, apply_min_p, apply_penalties, apply_top_k_top_p
from ember.engine.sampling_params import SamplingParams, SamplingParamsError

V = 50


def _logits(rows: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3


def _kept(x: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(x)


@pytest.mark.parametrize("k", [1, 3, 17, V])
def test_top_k_matches_transformers(k: int) -> None:
    x = _logits()
    ours = apply_top_k_top_p(x, torch.full((6,), k), torch.ones(6))
    ref = TopKLogitsWarper(top_k=k)(None, x.clone())
    assert torch.equal(_kept(ours), _kept(ref))
    assert torch.equal(ours[_kept(ours)], x[_kept(ours)])  # kept logits unchanged


@pytest.mark.parametrize("p", [0.05, 0.3, 0.75, 0.99])
def test_top_p_matches_transformers_and_the_definition(p: float) -> None:
    x = _logits()
    ours = apply_top_k_top_p(x, torch.zeros(6, dtype=torch.long), torch.full((6,), p))
    ref = TopPLogitsWarper(top_p=p)(None, x.clone())
    assert torch.equal(_kept(ours), _kept(ref))
    probs = torch.softmax(x, -1)
    for row in range(6):  # the smallest set of most likely tokens whose mass reaches p
        order = probs[row].argsort(descending=True).tolist()
        mass, keep = 0.0, set()
        for t in order:
            keep.add(t)
            mass += probs[row, t].item()
            if mass >= p:
                break
        assert set(torch.nonzero(_kept(ours[row])).flatten().tolist()) == keep


def test_top_k_then_top_p_per_row_settings() -> None:
    x = _logits()
    ks, ps = torch.tensor([0, 2, 5, 0, 10, 1]), torch.tensor([1.0, 1.0, 0.5, 0.2, 0.9, 0.3])
    ours = apply_top_k_top_p(x, ks, ps)
    for row in range(6):
        ref = x[row:row + 1].clone()
        if ks[row] > 0:
            ref = TopKLogitsWarper(int(ks[row]))(None, ref)
        ref = TopPLogitsWarper(float(ps[row]))(None, ref) if ps[row] < 1 else ref
        assert torch.equal(_kept(ours[row]), _kept(ref[0])), row


@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5])
def test_min_p_matches_transformers(min_p: float) -> None:
    x = _logits()
    ours = apply_min_p(x, torch.full((6,), min_p))
    ref = MinPLogitsWarper(min_p=min_p)(None, x.clone())
    assert torch.equal(_kept(ours), _kept(ref))


def test_penalties_match_transformers_and_openai_definition() -> None:
    x = _logits(2)
    prompt = [[1, 2, 3], [4, 4]]
    output = [[3, 3, 7], [9, 4, 9, 9]]
    mask = torch.zeros(2, V, dtype=torch.bool)
    counts = torch.zeros(2, V)
    for r in range(2):
        mask[r, prompt[r]] = True
        for t in output[r]:
            counts[r, t] += 1
    # Repetition alone = transformers' processor over prompt + output ids.
    ours = apply_penalties(x, mask, counts, torch.tensor([1.3, 0.8]), torch.zeros(2), torch.zeros(2))
    for r, rp in enumerate([1.3, 0.8]):
        ids = torch.tensor([prompt[r] + output[r]])
        ref = RepetitionPenaltyLogitsProcessor(rp)(ids, x[r:r + 1].clone())
        assert torch.allclose(ours[r], ref[0])
    # Frequency and presence: logit - f * count - p * [count > 0] over generated tokens only.
    ours = apply_penalties(x, mask, counts, torch.ones(2), torch.tensor([0.5, -0.3]), torch.tensor([1.0, 0.25]))
    expected = x - torch.tensor([[0.5], [-0.3]]) * counts - torch.tensor([[1.0], [0.25]]) * (counts > 0)
    assert torch.allclose(ours, expected)


def _req(params: SamplingParams, prompt=(1, 2, 3), output=()) -> Request:
    r = Request(f"r{id(params)}", list(prompt), params, max_tokens=100)
    r.token_ids += list(output)
    return r


def test_exponential_race_draws_from_the_softmax() -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    rows = 20000
    sampler = Sampler(5, set(), seed=0)
    reqs = [_req(SamplingParams(temperature=0.7))] * rows
    tokens = torch.tensor(sampler(logits.expand(rows, 5).clone(), reqs))
    freq = torch.bincount(tokens, minlength=5).float() / rows
    expected = torch.softmax(logits / 0.7, -1)
    assert (freq - expected).abs().max() < 0.015


def test_greedy_bias_min_tokens_and_logprobs() -> None:
    x = _logits(4)
    sampler = Sampler(V, {0}, seed=0)
    x[2, 0] = 100.0  # EOS would win, but min_tokens masks it
    reqs = [_req(SamplingParams(temperature=0, logprobs=3)),
            _req(SamplingParams(temperature=0, logit_bias={7: 1000.0})),
            _req(SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[5]), output=[9]),
            _req(SamplingParams(temperature=0, min_tokens=1), output=[9])]
    x[3, 0] = 100.0  # min_tokens already met: EOS allowed
    tokens = sampler(x.clone(), reqs)
    assert tokens[0] == int(x[0].argmax())
    assert tokens[1] == 7
    masked = x[2].clone()
    masked[[0, 5]] = float("-inf")
    assert tokens[2] == int(masked.argmax())
    assert tokens[3] == 0
    lp = torch.log_softmax(x[0], -1)
    entry = reqs[0].logprobs[0]
    top = torch.topk(lp, 3)
    assert list(entry) == top.indices.tolist()  # greedy token is rank 1, listed once
    for rank, (tid, value) in enumerate(zip(top.indices.tolist(), top.values.tolist()), 1):
        assert entry[tid].rank == rank and math.isclose(entry[tid].logprob, value, rel_tol=1e-6)
    assert math.isclose(reqs[0].cumulative_logprob, lp.max().item(), rel_tol=1e-6)


def test_seeded_rows_ignore_the_rest_of_the_batch() -> None:
    x = _logits(3)
    seeded = SamplingParams(temperature=1.0, seed=123)
    alone = Sampler(V, set(), seed=0)([x[1:2].clone()][0], [_req(seeded)])
    mixed = Sampler(V, set(), seed=99)(x.clone(), [_req(SamplingParams()), _req(seeded), _req(SamplingParams())])
    assert alone[0] == mixed[1]


@pytest.mark.parametrize("bad, field", [
    (dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_k=-2), "top_k"),
    (dict(min_p=1.5), "min_p"), (dict(n=0), "n"), (dict(max_tokens=0), "max_tokens"),
    (dict(min_tokens=5, max_tokens=2), "min_tokens"), (dict(presence_penalty=3), "presence_penalty"),
    (dict(repetition_penalty=0), "repetition_penalty"), (dict(logprobs=-1), "logprobs"),
    (dict(stop=[""]), "stop"), (dict(logit_bias={"x": 1}), "logit_bias"),
])
def test_bad_sampling_params_are_clear_value_errors(bad: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field) as info:
        SamplingParams(**bad)
    assert isinstance(info.value, SamplingParamsError)


def test_greedy_params_drop_filters() -> None:
    p = SamplingParams(temperature=0, top_p=0.5, top_k=3)
    assert p.greedy and p.top_p == 1.0 and p.top_k == 0
    assert SamplingParams(top_k=-1).top_k == 0
