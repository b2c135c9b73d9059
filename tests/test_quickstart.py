"""`ember quickstart --fast` runs every stage end to end (the full run is `make demo`)."""

from __future__ import annotations

import torch

import ember
from ember.checkpoint.registry import ModelNotFoundError, known_model_file
from ember.commands.quickstart import REAL_MODEL, QuickstartConfig, main


def test_quickstart_fast_runs_end_to_end(tmp_path, capsys) -> None:
    try:
        real_file = known_model_file(REAL_MODEL)
    except ModelNotFoundError as e:
        real_file, missing = None, str(e)
    state = main(QuickstartConfig(out=tmp_path / "qs", fast=True))
    out = capsys.readouterr().out
    model = ember.load_model(state.model_dir)
    tok = ember.load_tokenizer(state.model_dir)
    ids = tok.encode("print('hello')")
    assert tok.decode(ids) == "print('hello')"
    assert model(torch.tensor([ids])).shape == (1, len(ids), tok.vocab_size)
    assert (tmp_path / "qs" / "rag-index" / "index.json").is_file()  # the rag stage built its index
    assert (tmp_path / "qs" / "pretrained" / "config.json").is_file()
    assert state.model_dir == tmp_path / "qs" / "dpo" / "model"  # each tuning stage's merged model is the latest
    rows = state.perplexity
    assert set(rows) >= {"initial", "pretrained", "finetuned", "dpo", "quantized-gptq"}
    assert rows["pretrained"].result.bits_per_byte < 0.9 * rows["initial"].result.bits_per_byte
    if real_file is None:  # without the wheel, each real-model stage says how to install it and the run goes on
        assert out.count(f"skipped: {missing}") == 4 and "mmlu acc" in out
        return
    # the real model's stages: chat, rag over the existing index, SFT, and 4-bit RTN (--fast skips GPTQ and AWQ)
    assert state.real is not None and state.real.file == real_file
    assert "Q: What is the capital of France?" in out and "Paris" in out
    assert "documents already in the index" not in out.split(f"{REAL_MODEL} rag")[1]  # no re-ingest
    assert "held-out assistant-token loss" in out.split(f"{REAL_MODEL} finetune")[1]
    assert (tmp_path / "qs" / f"{REAL_MODEL}-finetune" / "adapter").is_dir()
    real_rows = {k: v for k, v in rows.items() if k.startswith(REAL_MODEL)}
    assert set(real_rows) == {f"{REAL_MODEL} {m}" for m in ("fp32", "rtn-4b-g64")}
    assert len({r.result.bytes for r in rows.values()}) == 1  # one held-out set for every row
    # a pretrained model beats one trained for seconds, per byte (their tokens differ)
    assert real_rows[f"{REAL_MODEL} fp32"].result.bits_per_byte < rows["dpo"].result.bits_per_byte
    assert "caveat" in out and "Q4_1" in out
