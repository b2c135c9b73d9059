"""Quantized checkpoints in the Hugging Face layouts: ember reloads its own with identical outputs,
and the tensors decode with the formats' reference rules (AutoGPTQ v1, AutoAWQ GEMM, bitsandbytes)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import ember
from ember.checkpoint.hf import CheckpointError
from ember.quant import GroupQuantLinear, Int8Linear, NF4Linear, QuantConfig, quantize_model

CASES = {
    "int8": QuantConfig(method="int8"),
    "nf4": QuantConfig(method="nf4", double_quant=False),
    "nf4-dq": QuantConfig(method="nf4", double_quant=True),
    "rtn-3b": QuantConfig(method="rtn", bits=3, group_size=32),
    "gptq-4b-actorder": QuantConfig(method="gptq", bits=4, group_size=32, act_order=True),
    "gptq-8b-sym": QuantConfig(method="gptq", bits=8, group_size=-1, sym=True),
    "awq-4b": QuantConfig(method="awq", bits=4, group_size=32, awq_grid=4),
}


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """A tiny transformers Llama whose widths suit every packing (multiples of 64)."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("llama")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                                   bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def saved(hf_llama, tmp_path_factory):
    """Every case quantized, saved and reloaded once: name -> (quantized model, folder, reloaded)."""
    calib = torch.randint(3, 128, (4, 32))
    out = {}
    for name, qcfg in CASES.items():
        model = quantize_model(ember.load_model(hf_llama), qcfg, calib)
        folder = tmp_path_factory.mktemp(name)
        ember.save_model(model, folder)
        out[name] = (model, folder, ember.load_model(folder))
    return out


def tensors(folder) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("name", list(CASES))
def test_reload_gives_identical_outputs(saved, name: str) -> None:
    model, folder, reloaded = saved[name]
    ids = torch.randint(3, 128, (2, 24))
    with torch.no_grad():
        assert torch.equal(model(ids), reloaded(ids))
    qcfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == {"int8": "bitsandbytes", "nf4": "bitsandbytes", "nf4-dq": "bitsandbytes",
                                    "awq-4b": "awq"}.get(name, "gptq")
    assert reloaded.quantization_config == qcfg
    kinds = {type(m) for m in reloaded.modules()}
    assert ({Int8Linear, NF4Linear, GroupQuantLinear} & kinds) and torch.nn.Linear in kinds  # lm_head stays float
    out = ember.generate(reloaded, ids[:1, :4], max_new_tokens=6)
    assert out.shape == (1, 10)


def autogptq_dequantize(t: dict[str, torch.Tensor], prefix: str, bits: int) -> torch.Tensor:
    """AutoGPTQ v1's torch path (4/8 bits): shift-and-mask, zeros + 1, scales by g_idx; (out, in)."""
    qweight, qzeros, scales, g_idx = (t[prefix + k] for k in ("qweight", "qzeros", "scales", "g_idx"))
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    zeros = torch.bitwise_right_shift(qzeros.unsqueeze(2).expand(-1, -1, 32 // bits), shifts.view(1, 1, -1))
    zeros = (torch.bitwise_and(zeros, 2 ** bits - 1) + 1).reshape(scales.shape)
    weight = torch.bitwise_right_shift(qweight.unsqueeze(1).expand(-1, 32 // bits, -1), shifts.view(1, -1, 1))
    weight = torch.bitwise_and(weight, 2 ** bits - 1).reshape(-1, weight.shape[2])
    g = g_idx.long()
    return ((weight - zeros[g]).float() * scales[g].float()).T


def autoawq_dequantize(t: dict[str, torch.Tensor], prefix: str, group_size: int) -> torch.Tensor:
    """AutoAWQ's unpack: nibbles in order, then AWQ_REVERSE_ORDER [0, 4, 1, 5, 2, 6, 3, 7]; (out, in)."""
    reverse = [0, 4, 1, 5, 2, 6, 3, 7]
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)

    def unpack(p: torch.Tensor) -> torch.Tensor:
        iw = torch.bitwise_right_shift(p[:, :, None], shifts[None, None, :]).reshape(p.shape[0], -1)
        return torch.bitwise_and(iw.view(-1, 8)[:, reverse].reshape(p.shape[0], -1), 0xF)

    w, z, s = unpack(t[prefix + "qweight"]), unpack(t[prefix + "qzeros"]), t[prefix + "scales"].float()
    z, s = z.repeat_interleave(group_size, 0), s.repeat_interleave(group_size, 0)
    return ((w - z).float() * s).T


@pytest.mark.parametrize("name, bits", [("gptq-4b-actorder", 4), ("gptq-8b-sym", 8)])
def test_gptq_tensors_decode_with_autogptq_rules(saved, name: str, bits: int) -> None:
    model, folder, _ = saved[name]
    t = tensors(folder)
    prefix = "model.layers.1.mlp.down_proj."
    assert t[prefix + "qweight"].dtype == torch.int32 and t[prefix + "qweight"].shape == (128 * bits // 32, 64)
    assert t[prefix + "scales"].dtype == torch.float16 and t[prefix + "g_idx"].dtype == torch.int32
    module = model.get_submodule(prefix[:-1])
    assert torch.equal(autogptq_dequantize(t, prefix, bits), module.dequantize())


def test_awq_tensors_decode_with_autoawq_rules(saved) -> None:
    model, folder, _ = saved["awq-4b"]
    t = tensors(folder)
    prefix = "model.layers.0.self_attn.q_proj."
    assert t[prefix + "qweight"].shape == (64, 64 // 8) and "g_idx" not in {k[len(prefix):] for k in t}
    assert torch.equal(autoawq_dequantize(t, prefix, 32), model.get_submodule(prefix[:-1]).dequantize())


@pytest.mark.parametrize("name", ["nf4", "nf4-dq"])
def test_nf4_state_reads_back_through_bitsandbytes(saved, name: str) -> None:
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    model, folder, _ = saved[name]
    t = tensors(folder)
    prefix = "model.layers.0.mlp.up_proj.weight"
    qs = {k: v for k, v in t.items() if k.startswith(prefix + ".")}
    state = bnb_f.QuantState.from_dict(qs, device=torch.device("cpu"))
    ref = bnb_f.dequantize_4bit(t[prefix], state)
    assert torch.equal(ref, model.get_submodule("model.layers.0.mlp.up_proj").dequantize())


@pytest.mark.parametrize("name", ["int8", "nf4-dq"])
def test_transformers_loads_our_bitsandbytes_checkpoints(saved, name: str) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    model, folder, _ = saved[name]
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=torch.float32)
    ours = model.get_submodule("model.layers.1.self_attn.o_proj")
    theirs = hf.get_submodule("model.layers.1.self_attn.o_proj")
    if name == "int8":
        assert torch.equal(theirs.weight.data, ours.weight) and torch.equal(theirs.weight.SCB, ours.SCB)
    ids = torch.randint(3, 128, (1, 16))
    with torch.no_grad():
        a, b = hf(ids).logits, model(ids)
    # bitsandbytes computes in lower precision on CPU (int8 activations / bf16), ember in fp32.
    assert (a - b).abs().max() < 0.05 * b.abs().max()


def test_bad_quantization_configs_are_one_line_errors(saved, tmp_path) -> None:
    _, folder, _ = saved["gptq-4b-actorder"]
    cfg = json.loads((folder / "config.json").read_text())
    for change, needle in (({"quant_method": "fp8"}, "quant_method 'fp8'"),
                           ({"checkpoint_format": "gptq_v2"}, "checkpoint_format 'gptq_v2'"),
                           ({"bits": "four"}, "integer 'bits'")):
        bad = tmp_path / needle.split()[0]
        bad.mkdir()
        (bad / "model.safetensors").symlink_to(folder / "model.safetensors")
        (bad / "config.json").write_text(json.dumps({**cfg, "quantization_config": {**cfg["quantization_config"],
                                                                                      **change}}))
        with pytest.raises(CheckpointError, match=needle):
            ember.load_model(bad)
