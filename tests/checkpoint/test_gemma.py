"""Gemma 3 (gemma3_text) checkpoints: PEFT LoRA adapters both ways on tiny random models made by
transformers (logit, save and greedy parity are in tests/model/test_hf_parity.py and
tests/engine/test_engine_parity.py; the real 270M GGUF in test_gemma3_gguf.py)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import ember
from ember.adapters.lora import LoRAConfig, apply_lora, lora_layers, merge_and_unload
from ember.checkpoint.peft import save_adapter
from tests.hf_models import make_hf_model

TOL = 1e-4
IDS = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(1))
GEMMAS = ["gemma3-interleaved", "gemma3-mqa-softcap"]


@torch.no_grad()
@pytest.mark.parametrize("family, targets, rslora", [("gemma3-interleaved", "all-linear", False),
                                                     ("gemma3-mqa-softcap", ("q_proj", "v_proj", "down_proj"), True)])
def test_ember_adapter_loads_in_peft(family, targets, rslora, tmp_path) -> None:
    import peft

    hf = make_hf_model(family, tmp_path / "base")
    base_logits = hf(IDS).logits
    model = ember.load_model(tmp_path / "base")
    apply_lora(model, LoRAConfig(r=4, alpha=8, targets=targets, rslora=rslora))
    for _, layer in lora_layers(model):
        nn.init.normal_(layer.lora_B.weight, std=0.3)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    ours = model(IDS)
    assert (ours - base_logits).abs().max() > 1e-2  # the adapter changes the output
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["use_rslora"] == rslora
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    assert (peft_model(IDS).logits - ours).abs().max().item() < TOL
    again = ember.load_model(tmp_path / "base", adapter=tmp_path / "adapter")
    assert (again(IDS) - ours).abs().max().item() < TOL


@torch.no_grad()
@pytest.mark.parametrize("family", GEMMAS)
def test_peft_adapter_loads_in_ember(family, tmp_path) -> None:
    import peft

    hf = make_hf_model(family, tmp_path / "base")
    base_logits = hf(IDS).logits
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "o_proj", "gate_proj", "down_proj"],
                             rank_pattern={"down_proj": 2}, alpha_pattern={"o_proj": 3}, init_lora_weights=False)
    peft_model = peft.get_peft_model(hf, config).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    ref = peft_model(IDS).logits
    assert (ref - base_logits).abs().max() > 1e-2
    model = ember.load_model(tmp_path / "base", adapter=tmp_path / "adapter")
    layer = model.model.layers[0]
    assert layer.mlp.down_proj.r == 2 and layer.self_attn.o_proj.alpha == 3 and layer.self_attn.k_proj.r == 4
    assert (model(IDS) - ref).abs().max().item() < TOL
    merge_and_unload(model)
    assert (model(IDS) - ref).abs().max().item() < TOL
