"""ember's Transformer against transformers on the same tiny random weights, for every family."""

from __future__ import annotations

import pytest
import torch

import ember
from ember.model.generate import generate
from tests.hf_models import FAMILIES, make_hf_model

TOL = 1e-4


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> str:
    return request.param


def _ids(batch: int = 2, length: int = 24) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def test_logits_match_transformers(family: str, tmp_path) -> None:
    hf = make_hf_model(family, tmp_path)
    model = ember.load_model(tmp_path)
    ids = _ids()
    ref = hf(ids).logits
    ours = model(ids)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() < TOL


@torch.no_grad()
def test_save_model_loads_in_transformers(family: str, tmp_path) -> None:
    import transformers

    make_hf_model(family, tmp_path / "src")
    model = ember.load_model(tmp_path / "src")
    ember.save_model(model, tmp_path / "out")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = _ids()
    assert (hf(ids).logits - model(ids)).abs().max().item() < TOL


@torch.no_grad()
def test_greedy_generate_matches_transformers(family: str, tmp_path) -> None:
    hf = make_hf_model(family, tmp_path)
    model = ember.load_model(tmp_path)
    prompt = _ids(1, 12)
    ref = hf.generate(prompt, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    ours = generate(model, prompt, max_new_tokens=32)
    assert ours.shape == ref.shape == (1, 44)
    assert torch.equal(ours, ref)
