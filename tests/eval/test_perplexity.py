"""Rolling perplexity against a direct transformers computation and hand-computed windows."""

from __future__ import annotations

import math

import pytest
import torch

import ember
from ember.eval.perplexity import perplexity, rolling_loglikelihood, rolling_windows
from tests.hf_models import make_hf_model


def test_windows_cover_every_token_once() -> None:
    for n in (1, 5, 16, 17, 100):
        for max_len, stride in ((16, 16), (16, 4), (8, 1)):
            ws = rolling_windows(n, max_len, stride)
            predicted = [i for _, end, k in ws for i in range(end - k, end)]
            assert predicted == list(range(n))
            assert all(end - start <= max_len and k <= end - start for start, end, k in ws)
    assert rolling_windows(20, 8) == [(0, 8, 8), (8, 16, 8), (12, 20, 4)]
    with pytest.raises(ValueError):
        rolling_windows(10, 8, 9)


@torch.no_grad()
def test_loglikelihood_matches_transformers_full_context(tmp_path) -> None:
    hf = make_hf_model("llama-gqa-llama3-rope", tmp_path)
    model = ember.load_model(tmp_path)
    ids = torch.randint(3, 128, (40,)).tolist()
    seq = torch.tensor([[2, *ids]])
    ref = torch.log_softmax(hf(seq).logits[0, :-1].float(), -1).gather(-1, seq[0, 1:, None]).sum().item()
    # One window holding the whole document is the full-context log-likelihood.
    ours = rolling_loglikelihood(model, ids, prefix_id=2, max_len=64)
    assert abs(ours - ref) < 1e-3
    # Disjoint windows lose context, so they can only score differently, never crash or skip.
    assert rolling_loglikelihood(model, ids, 2, max_len=16, batch_size=2) != pytest.approx(ref, abs=1e-3)


def test_metrics_from_a_uniform_model() -> None:
    vocab = 50

    def uniform(batch: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*batch.shape, vocab)

    texts = ["one two three", "four  five\nsix seven"]
    res = perplexity(uniform, lambda s: [ord(c) % vocab for c in s], texts, prefix_id=0, max_len=4)
    n_tokens = sum(len(t) for t in texts)
    assert res.tokens == n_tokens and res.documents == 2
    assert res.token_perplexity == pytest.approx(vocab)
    assert res.words == 3 + 4
    assert res.bits_per_byte == pytest.approx(n_tokens * math.log2(vocab) / res.bytes)
    assert res.byte_perplexity == pytest.approx(2 ** res.bits_per_byte)
