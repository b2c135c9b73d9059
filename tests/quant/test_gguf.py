"""GGUF export read back with the `gguf` package: llama.cpp's tensor names, types and metadata,
the tokenizer, and a q/k permutation that gives llama.cpp's RoPE the same attention scores; and
`ember export`'s one-line errors for an --out it cannot write or an unknown --type.
(llama.cpp itself reading an export: test_gguf_llama_cpp.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ember.checkpoint.hf import save_model
from ember.config import preset
from ember.data.sources import pydoc_topics
from ember.model.rope import apply_rope, rope_cos_sin
from ember.model.transformer import Transformer
from ember.quant.gguf import ExportError, export_gguf, permute_rope_rows
from ember.tokenizer import train_tokenizer

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def model_and_tok():
    tok = train_tokenizer((d.text for d in list(pydoc_topics())[:40]), vocab_size=512, show_progress=False)
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=tok.vocab_size, eos_token_id=tok.eos_token_id)).eval()
    return model, tok


def read(path):
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    return {t.name: t for t in reader.tensors}, fields


def test_names_metadata_and_tokenizer(model_and_tok, tmp_path) -> None:
    model, tok = model_and_tok
    cfg = model.config
    tensors, fields = read(export_gguf(model, tok, tmp_path / "m.gguf", "f32"))
    per_block = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                 "ffn_down")
    expected = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(cfg.num_layers) for n in per_block}
    assert set(tensors) == expected  # tied LM head: llama.cpp reuses token_embd
    assert fields["general.architecture"] == "llama"
    assert fields["llama.block_count"] == cfg.num_layers
    assert fields["llama.attention.head_count"] == cfg.num_heads
    assert fields["llama.attention.head_count_kv"] == cfg.n_kv_heads
    assert fields["llama.embedding_length"] == cfg.hidden_size
    assert fields["llama.feed_forward_length"] == cfg.intermediate_size
    assert fields["llama.rope.freq_base"] == pytest.approx(cfg.rope_theta)
    assert fields["general.file_type"] == gguf.LlamaFileType.ALL_F32
    assert fields["tokenizer.ggml.model"] == "gpt2"
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == cfg.vocab_size
    assert all(tokens[i] == t for i, t in enumerate(tok.convert_ids_to_tokens(range(tok.vocab_size))))
    assert fields["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert len(fields["tokenizer.ggml.merges"]) > 100
    assert fields["tokenizer.chat_template"] == tok.chat_template
    emb = tensors["token_embd.weight"]
    assert np.array_equal(np.asarray(emb.data).reshape(cfg.vocab_size, cfg.hidden_size),
                          model.model.embed_tokens.weight.detach().numpy())


def test_permuted_q_k_give_llamacpp_rope_the_same_scores(model_and_tok, tmp_path) -> None:
    model, tok = model_and_tok
    cfg = model.config
    tensors, _ = read(export_gguf(model, tok, tmp_path / "m.gguf", "f32"))
    attn = model.model.layers[0].self_attn
    hd = cfg.d_head
    wq = torch.from_numpy(np.asarray(tensors["blk.0.attn_q.weight"].data).reshape(-1, cfg.hidden_size).copy())
    wk = torch.from_numpy(np.asarray(tensors["blk.0.attn_k.weight"].data).reshape(-1, cfg.hidden_size).copy())
    assert torch.equal(wq, permute_rope_rows(attn.q_proj.weight.detach(), cfg.num_heads))
    x = torch.randn(1, 6, cfg.hidden_size)
    pos = torch.arange(6).unsqueeze(0)
    # Ember / HF: rotate-half RoPE on the original projections.
    q = attn.q_proj(x).view(1, 6, cfg.num_heads, hd)
    k = attn.k_proj(x).view(1, 6, cfg.n_kv_heads, hd)
    q, k = apply_rope(q, k, *rope_cos_sin(cfg, pos, torch.float32))
    # llama.cpp (LLAMA_ROPE_TYPE_NORM): rotate adjacent pairs (2i, 2i+1) by pos * theta^(-2i/d).
    def rope_pairs(t: torch.Tensor) -> torch.Tensor:
        inv = cfg.rope_theta ** (-torch.arange(0, hd, 2).float() / hd)
        ang = pos.float().view(1, 6, 1, 1) * inv
        a, b = t[..., 0::2], t[..., 1::2]
        return torch.stack([a * ang.cos() - b * ang.sin(), a * ang.sin() + b * ang.cos()], -1).flatten(-2)
    q2 = rope_pairs((x @ wq.T).view(1, 6, cfg.num_heads, hd))
    k2 = rope_pairs((x @ wk.T).view(1, 6, cfg.n_kv_heads, hd))
    rep = cfg.num_heads // cfg.n_kv_heads
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(rep, 2))
    scores2 = torch.einsum("bqhd,bkhd->bhqk", q2, k2.repeat_interleave(rep, 2))
    assert torch.allclose(scores, scores2, atol=1e-5)


@pytest.mark.parametrize("kind, qtype, tol", [("f16", "F16", 1e-3), ("q8_0", "Q8_0", 1e-2), ("q4_0", "Q4_0", 0.15)])
def test_quantized_types_dequantize_to_the_weights(model_and_tok, tmp_path, kind, qtype, tol) -> None:
    model, tok = model_and_tok
    tensors, fields = read(export_gguf(model, tok, tmp_path / f"m-{kind}.gguf", kind))
    assert fields["general.file_type"] == getattr(gguf.LlamaFileType, f"MOSTLY_{kind.upper()}")
    t = tensors["blk.1.ffn_gate.weight"]
    assert t.tensor_type.name == qtype
    assert tensors["blk.1.ffn_norm.weight"].tensor_type.name == "F32"
    # ffn_down rows hold 176 values: not whole blocks of 32, so they fall back to f16.
    assert tensors["blk.1.ffn_down.weight"].tensor_type.name == "F16"
    w = model.model.layers[1].mlp.gate_proj.weight.detach()
    got = torch.from_numpy(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(w.shape).copy())
    assert (got - w).norm() / w.norm() < tol


def test_unsupported_models_are_refused(model_and_tok, tmp_path) -> None:
    _, tok = model_and_tok
    moe = Transformer(preset("tiny-moe", vocab_size=tok.vocab_size))
    with pytest.raises(ExportError, match="dense Llama-block RoPE"):
        export_gguf(moe, tok, tmp_path / "x.gguf")
    sequential_falcon_like = Transformer(preset("tiny", vocab_size=tok.vocab_size, norm="layernorm",
                                                gated_mlp=False, mlp_act="gelu"))
    gemma_like = Transformer(preset("tiny", vocab_size=tok.vocab_size, norm="rms_offset", mlp_act="gelu_tanh",
                                    sandwich_norm=True, embed_scale=True))
    for model in (sequential_falcon_like, gemma_like):
        with pytest.raises(ExportError, match="not Gemma 3, sequential Falcon"):
            export_gguf(model, tok, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def ember_export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ember", "export", "--format", "gguf", *args],
                          capture_output=True, text=True, timeout=300, check=False)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """stderr without argparse's usage block (its first line and the flag lines that continue it)."""
    return [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith(("usage:", " "))]


@pytest.fixture(scope="module")
def tiny_dir(model_and_tok, tmp_path_factory) -> Path:
    model, tok = model_and_tok
    folder = tmp_path_factory.mktemp("tiny")
    save_model(model, folder)
    tok.save(folder)
    return folder


@pytest.mark.parametrize("out, needle", [
    ("{file}/m.gguf", "is a file, not a folder"),
    ("{file}/deeper/m.gguf", "is a file, not a folder"),
    ("{tmp}", "is a folder"),
])
def test_export_to_a_path_that_cannot_be_written_is_one_line(tiny_dir, tmp_path, out: str, needle: str) -> None:
    (tmp_path / "file").write_text("not a folder")
    proc = ember_export("--model", str(tiny_dir), "--out", out.format(file=tmp_path / "file", tmp=tmp_path))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = error_lines(proc)
    assert len(lines) == 1 and needle in lines[0], proc.stderr


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write anywhere")
def test_export_into_a_read_only_folder_is_one_line(tiny_dir, tmp_path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    proc = ember_export("--model", str(tiny_dir), "--out", str(ro / "m.gguf"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = error_lines(proc)
    assert len(lines) == 1 and "no permission" in lines[0], proc.stderr


def test_export_into_a_missing_folder_creates_it(tiny_dir, tmp_path) -> None:
    out = tmp_path / "new" / "deeper" / "m.gguf"
    proc = ember_export("--model", str(tiny_dir), "--out", str(out), "--type", "q4_0")
    assert proc.returncode == 0, proc.stderr
    assert gguf.GGUFReader(out).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_0


def test_unknown_gguf_type_exits_non_zero_naming_it(model_and_tok, tiny_dir, tmp_path) -> None:
    proc = ember_export("--model", str(tiny_dir), "--out", str(tmp_path / "m.gguf"), "--type", "q5_0")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    lines = error_lines(proc)
    assert len(lines) == 1 and "--type" in lines[0] and "q5_0" in lines[0] and "q4_0" in lines[0], proc.stderr
    assert not list(tmp_path.iterdir())
    with pytest.raises(ExportError, match="unknown GGUF type 'q5_0'; choose one of f32, f16, q8_0, q4_0"):
        export_gguf(*model_and_tok, tmp_path / "m.gguf", "q5_0")
