"""PEFT format both ways: ember's adapters load in peft on transformers, peft's load in ember."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import ember
from ember.adapters.lora import LoRAConfig, LoRAError, apply_lora, lora_layers, merge_and_unload
from ember.checkpoint.peft import load_adapter, save_adapter
from tests.hf_models import make_hf_model

TOL = 1e-4
IDS = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(1))


def _randomize(model: nn.Module) -> None:
    for _, layer in lora_layers(model):
        nn.init.normal_(layer.lora_B.weight, std=0.3)


@torch.no_grad()
@pytest.mark.parametrize("family, targets, rslora", [
    ("llama-gqa-llama3-rope", ("q_proj", "v_proj"), False),
    ("qwen2-bias-tied", "all-linear", True),
    ("mixtral-4x2", r".*self_attn\.(q|k|v|o)_proj", False),
])
def test_ember_adapter_loads_in_peft(family, targets, rslora, tmp_path) -> None:
    import peft

    hf = make_hf_model(family, tmp_path / "base")
    base_logits = hf(IDS).logits
    model = ember.load_model(tmp_path / "base")
    apply_lora(model, LoRAConfig(r=4, alpha=8, targets=targets, rslora=rslora))
    _randomize(model)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    ours = model(IDS)
    assert (ours - base_logits).abs().max() > 1e-2  # the adapter changes the output
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    assert (peft_model(IDS).logits - ours).abs().max().item() < TOL


@torch.no_grad()
@pytest.mark.parametrize("family, rslora", [("llama-linear-rope", False), ("mistral-sliding-window", True)])
def test_peft_adapter_loads_in_ember(family, rslora, tmp_path) -> None:
    import peft

    hf = make_hf_model(family, tmp_path / "base")
    base_logits = hf(IDS).logits
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                             use_rslora=rslora, rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3},
                             init_lora_weights=False)  # random A and B: a non-trivial adapter
    peft_model = peft.get_peft_model(hf, config).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    ref = peft_model(IDS).logits
    assert (ref - base_logits).abs().max() > 1e-2
    model = ember.load_model(tmp_path / "base", adapter=tmp_path / "adapter")
    assert not any(p.requires_grad for p in model.parameters())
    down = model.model.layers[0].mlp.down_proj
    assert down.r == 2 and model.model.layers[1].self_attn.v_proj.alpha == 3
    assert (model(IDS) - ref).abs().max().item() < TOL
    merge_and_unload(model)
    assert (model(IDS) - ref).abs().max().item() < TOL


def test_save_load_roundtrip_keeps_ranks_and_trainability(tmp_path) -> None:
    make_hf_model("llama-linear-rope", tmp_path / "base")
    model = ember.load_model(tmp_path / "base")
    apply_lora(model, LoRAConfig(r=4, alpha=16, targets="all-linear"))
    from ember.adapters.lora import wrap_module  # a layer with its own rank -> rank_pattern
    model.model.layers[0].mlp.up_proj = model.model.layers[0].mlp.up_proj.base_layer
    wrap_module(model, "model.layers.0.mlp.up_proj", r=2, alpha=5)
    _randomize(model)
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["rank_pattern"] == {"model.layers.0.mlp.up_proj": 2}
    assert config["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj",
                                               "gate_proj", "up_proj", "down_proj"])
    again = ember.load_model(tmp_path / "base")
    load_adapter(again, tmp_path / "adapter", trainable=True)
    trainable = [n for n, p in again.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 14 and all("lora_" in n for n in trainable)
    with torch.no_grad():
        assert torch.equal(again(IDS), model.eval()(IDS))


def test_save_model_refuses_lora_layers(tmp_path) -> None:
    make_hf_model("llama-linear-rope", tmp_path / "base")
    model = ember.load_model(tmp_path / "base")
    apply_lora(model, LoRAConfig())
    with pytest.raises(ember.CheckpointError, match="save_adapter"):
        ember.save_model(model, tmp_path / "out")
    merge_and_unload(model)
    ember.save_model(model, tmp_path / "out")


@pytest.fixture(scope="module")
def adapter_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    make_hf_model("llama-linear-rope", root / "base")
    model = ember.load_model(root / "base")
    apply_lora(model, LoRAConfig())
    save_adapter(model, root / "adapter")
    return root


def _broken(root, tmp_path, edit) -> object:
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(root / "adapter", folder)
    edit(folder)
    return folder


def _edit_config(**changes):
    def edit(folder):
        path = folder / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return edit


@pytest.mark.parametrize("edit, needle", [
    (lambda f: (f / "adapter_model.safetensors").unlink(), "has no adapter_model.safetensors"),
    (lambda f: (f / "adapter_config.json").unlink(), "has no adapter_config.json"),
    (_edit_config(peft_type="IA3"), "is a IA3 adapter"),
    (_edit_config(use_dora=True), "DoRA"),
    (_edit_config(modules_to_save=["lm_head"]), "modules_to_save"),
    (_edit_config(r=16), "expected \\(16, 64\\)"),
    (lambda f: (f / "adapter_model.safetensors").write_bytes(b"garbage"), "not a readable safetensors"),
])
def test_broken_adapters_are_one_clear_error(adapter_folder, tmp_path, edit, needle) -> None:
    folder = _broken(adapter_folder, tmp_path, edit)
    with pytest.raises(LoRAError, match=needle):
        ember.load_model(adapter_folder / "base", adapter=folder)


def test_adapter_for_another_architecture_is_refused(adapter_folder, tmp_path) -> None:
    with pytest.raises(LoRAError, match="does not exist"):
        ember.load_model(adapter_folder / "base", adapter=tmp_path / "nope")
    model = ember.Transformer(ember.preset("tiny", num_layers=1))
    with pytest.raises(LoRAError, match="model.layers.1.* does not have"):
        load_adapter(model, adapter_folder / "adapter")


def test_generate_with_adapter(tmp_path, capsys) -> None:
    from ember.commands.generate import GenerateConfig, main
    from ember.model.generate import generate
    from ember.tokenizer import DEFAULT_CHAT_TEMPLATE, train_tokenizer

    tok = train_tokenizer(["def f(x):\n    return x + 1\n"] * 50, vocab_size=300, show_progress=False)
    tok.chat_template = tok.chat_template or DEFAULT_CHAT_TEMPLATE
    model = ember.Transformer(ember.preset("tiny", vocab_size=tok.vocab_size)).eval()
    ember.save_model(model, tmp_path / "base")
    tok.save(tmp_path / "base")
    apply_lora(model, LoRAConfig(r=4, targets="all-linear"))
    for _, layer in lora_layers(model):
        nn.init.normal_(layer.lora_B.weight, std=2.0)
    save_adapter(model, tmp_path / "adapter")
    ids = tok.encode("def f")
    expected = generate(model, torch.tensor([ids]), 12)[0, len(ids):].tolist()
    main(GenerateConfig(model=tmp_path / "base", adapter=tmp_path / "adapter", prompt="def f", max_tokens=12))
    out = capsys.readouterr().out
    assert out == "def f" + tok.decode(expected, skip_special_tokens=True) + "\n"
    main(GenerateConfig(model=tmp_path / "base", prompt="def f", max_tokens=12))
    assert capsys.readouterr().out != out
