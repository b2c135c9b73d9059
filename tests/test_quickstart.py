"""`ember quickstart --fast` runs every stage end to end (the full run is `make demo`)."""

from __future__ import annotations

import torch

import ember
from ember.commands.quickstart import QuickstartConfig, main


def test_quickstart_fast_runs_end_to_end(tmp_path) -> None:
    state = main(QuickstartConfig(out=tmp_path / "qs", fast=True))
    model = ember.load_model(state.model_dir)
    tok = ember.load_tokenizer(state.model_dir)
    ids = tok.encode("print('hello')")
    assert tok.decode(ids) == "print('hello')"
    assert model(torch.tensor([ids])).shape == (1, len(ids), tok.vocab_size)
    assert (tmp_path / "qs" / "rag-index" / "index.json").is_file()  # the rag stage built its index
    assert (tmp_path / "qs" / "pretrained" / "config.json").is_file()
    assert state.model_dir == tmp_path / "qs" / "dpo" / "model"  # each tuning stage's merged model is the latest
    assert set(state.perplexity) >= {"initial", "pretrained", "finetuned", "dpo"}
    assert state.perplexity["pretrained"] < state.perplexity["initial"] / 2
