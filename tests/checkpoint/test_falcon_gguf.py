"""Falcon as GGUF (architecture `falcon`): ember's export read back by transformers, by ember and by
llama.cpp itself (`llama-simple`), on tiny random Falcons made by transformers.

transformers reads a falcon GGUF as Falcon-7B (multi-query, one LayerNorm, tied head), so that shape
is compared with it; the new decoder architecture (GQA, two norms) goes through ember and llama.cpp.
"""

from __future__ import annotations

import subprocess

import pytest
import torch

import ember
from ember.quant.gguf import ExportError, export_gguf
from ember.tokenizer import train_tokenizer
from tests.hf_models import make_hf_model
from tests.outside_tools import outside_tool

pytest.importorskip("gguf")

TOL = 1e-4
PROMPTS = ("The for statement", "A tuple is", "def f(x):")


def _falcon(family: str, tmp_path, **overrides):
    """(transformers model, ember model, tokenizer) of a tiny Falcon whose vocabulary is a trained BPE."""
    from pydoc_data.topics import topics

    tok = train_tokenizer([topics[k] for k in sorted(topics)[:40]], vocab_size=400, show_progress=False)
    # ffn 4 x hidden: llama.cpp's converter writes that, and transformers reads no other from GGUF
    hf = make_hf_model(family, tmp_path / "hf", vocab_size=tok.vocab_size, ffn_hidden_size=256,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       **overrides)
    return hf, ember.load_model(tmp_path / "hf"), tok


def _ids(tok) -> torch.Tensor:
    return torch.tensor([tok.encode("The for statement is used to iterate over the elements of a sequence")])


@torch.no_grad()
def test_export_reads_back_in_transformers_and_ember(tmp_path) -> None:
    hf, model, tok = _falcon("falcon-mqa-parallel", tmp_path)
    path = export_gguf(model, tok, tmp_path / "falcon.gguf", "f32")
    import transformers

    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name,
                                                               dtype=torch.float32).eval()
    ours = ember.load_model(path)
    assert ours.config.hf_model_type == "falcon" and ours.config.n_kv_heads == 1 and not ours.config.parallel_mlp_norm
    ids = _ids(tok)
    ref = theirs(ids).logits
    assert (ours(ids) - ref).abs().max().item() < TOL
    assert (hf(ids).logits - ref).abs().max().item() < TOL  # the file holds the model it came from


@torch.no_grad()
@pytest.mark.parametrize("kind", ["f32", "q8_0"])
def test_new_decoder_architecture_round_trips(kind, tmp_path) -> None:
    hf, model, tok = _falcon("falcon-new-arch-gqa", tmp_path, bias=False)
    path = export_gguf(model, tok, tmp_path / "falcon.gguf", kind)
    ids = _ids(tok)
    back = ember.load_model(path)
    assert back.config.parallel_mlp_norm and back.config.n_kv_heads == 2
    err = (back(ids) - hf(ids).logits).abs().max().item()
    assert err < (TOL if kind == "f32" else 0.05 * hf(ids).logits.abs().max().item())
    kept = ember.load_model(path, keep_quantized=True)  # q8_0 blocks split into q/k/v rows as they are
    assert (kept(ids) - back(ids)).abs().max().item() < (TOL if kind == "f32" else 1e-3)


def test_export_refuses_what_llama_cpp_falcon_lacks(tmp_path) -> None:
    for family, overrides in (("falcon-rw-alibi", {}), ("falcon-new-arch-gqa", {})):  # ALiBi / biases
        make_hf_model(family, tmp_path / family, **overrides)
        with pytest.raises(ExportError, match="Falcon's parallel block"):
            export_gguf(ember.load_model(tmp_path / family), None, tmp_path / f"{family}.gguf")


@pytest.mark.parametrize("family, overrides", [("falcon-mqa-parallel", {}), ("falcon-new-arch-gqa", {"bias": False})])
def test_llama_cpp_continues_as_ember(family, overrides, tmp_path) -> None:
    """llama.cpp's greedy text on ember's f32 export is ember's (llama.cpp's GELU is the tanh form,
    Falcon's the exact one: the tiny models' logits are spread far wider than that difference)."""
    simple = outside_tool("llama.cpp", "llama-simple")
    _, model, tok = _falcon(family, tmp_path, **overrides)
    path = export_gguf(model, tok, tmp_path / "falcon.gguf", "f32")
    for prompt in PROMPTS:
        proc = subprocess.run([str(simple), "-m", str(path), "-n", "16", prompt], capture_output=True, timeout=300)
        assert proc.returncode == 0, proc.stderr.decode("utf-8", "replace")[-2000:]
        ids = tok.encode(prompt)
        with torch.no_grad():
            new = ember.generate(model, torch.tensor([ids]), 16)[0].tolist()
        assert proc.stdout.decode("utf-8", "replace").rstrip("\n") == tok.decode(new), prompt
