"""`ember finetune` and `ember dpo` end to end on a tiny model and the pydoc QA sets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ember
from ember.adapters.lora import LoRALinear, adapters_disabled
from ember.data.preference import load_preference_pairs, pair_batch
from ember.data.pydoc_qa import write_pydoc_sets
from ember.data.sources import DataSourceError
from ember.train.dpo import DPOConfig, DPOObjective, dpo, pair_logprobs
from ember.train.pretrain import PretrainConfig, pretrain
from ember.train.sft import FinetuneConfig, finetune
from tests.chat_tokenizers import chatml_tokenizer

FAST = dict(eval_every=0, save_every=0, progress=False, max_len=192, warmup_steps=2, device="cpu")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """A tiny base pretrained briefly on the bundled prose (ChatML tokenizer) and the pydoc sets.

    LoRA needs a trained base: on random weights the frozen embedding caps how far the logits
    can move, whatever the adapters learn.
    """
    root = tmp_path_factory.mktemp("ft")
    chatml_tokenizer().save(root / "tok")
    result = pretrain(PretrainConfig(out=root / "pt", model="tiny", tokenizer=root / "tok", data=["bundled-prose"],
                                     seq_len=128, batch_size=16, micro_batch_size=16, max_steps=150, lr=3e-3,
                                     warmup_steps=10, eval_every=0, save_every=0, val_fraction=0.05, progress=False,
                                     device="cpu"))
    return {"root": root, "base": result.model_dir, **write_pydoc_sets(root / "data", seed=0, max_sections=40)}


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sft_lowers_held_out_assistant_loss_and_saves_a_peft_adapter(setup) -> None:
    out = setup["root"] / "sft"
    cfg = FinetuneConfig(base=setup["base"], data=setup["sft_train"], val_data=setup["sft_val"], out=out,
                         lora_targets=["all-linear"], lora_r=16, lr=3e-3, max_steps=20, batch_size=8,
                         micro_batch_size=8, pack=True, merged=True, **FAST)
    result = finetune(cfg)
    before, after = result.val_before["val_loss"], result.val_after["val_loss"]
    assert after < before - 0.05, (before, after)
    # The saved adapter reproduces the trained model: same held-out loss through load_model(adapter=).
    assert (out / "adapter" / "adapter_config.json").exists() and (out / "adapter" / "tokenizer.json").exists()
    from ember.data.sft import load_sft_examples
    from ember.train.sft import SFTValidation
    from ember.train.distributed import init_distributed

    val = load_sft_examples(setup["sft_val"], chatml_tokenizer(), 192)
    measure = SFTValidation(val, 8, chatml_tokenizer().pad_token_id, init_distributed("cpu"))
    with torch.no_grad():
        reloaded = measure(ember.load_model(setup["base"], adapter=out / "adapter"))["val_loss"]
        merged = measure(ember.load_model(result.outputs["model"]))["val_loss"]
    assert abs(reloaded - after) < 1e-4 and abs(merged - after) < 1e-4
    steps = [r for r in _records(out / "metrics.jsonl") if "loss" in r]
    assert len(steps) == 20 and steps[-1]["loss"] < steps[0]["loss"]


@pytest.mark.slow
def test_interrupted_qlora_sft_resumes_to_the_same_adapter(setup) -> None:
    common = dict(base=setup["base"], data=setup["sft_train"], val_fraction=0.1, method="qlora", lora_r=4, lr=1e-3,
                  max_steps=4, batch_size=4, micro_batch_size=2, lora_dropout=0.1, **FAST)
    straight = finetune(FinetuneConfig(out=setup["root"] / "straight", **common))
    finetune(FinetuneConfig(out=setup["root"] / "resumed", **common), stop_at=2)
    resumed = finetune(FinetuneConfig(out=setup["root"] / "resumed", **common))
    a = ember.load_model(setup["base"], adapter=straight.outputs["adapter"])
    b = ember.load_model(setup["base"], adapter=resumed.outputs["adapter"])
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name


def test_full_fine_tuning_saves_a_model(setup) -> None:
    out = setup["root"] / "full"
    result = finetune(FinetuneConfig(base=setup["base"], data=setup["sft_train"], val_data=setup["sft_val"],
                                     out=out, method="full", lr=1e-3, max_steps=6, batch_size=4,
                                     micro_batch_size=4, **FAST))
    assert result.val_after["val_loss"] < result.val_before["val_loss"]
    assert set(result.outputs) == {"model"} and ember.load_tokenizer(result.outputs["model"]).chat_template


def test_dpo_logs_rewards_every_step_and_uses_the_base_as_reference(setup) -> None:
    out = setup["root"] / "dpo"
    result = dpo(DPOConfig(base=setup["base"], data=setup["dpo_train"], val_data=setup["dpo_val"], out=out,
                           lora_targets=["all-linear"], lora_r=8, lr=2e-3, max_steps=8, batch_size=8,
                           micro_batch_size=4, **FAST))
    steps = [r for r in _records(out / "metrics.jsonl") if "loss" in r]
    assert len(steps) == 8
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert all(key in r for r in steps)
    assert result.val_before["val_accuracy"] == 0.0  # policy == reference: every reward is 0
    assert result.val_after["val_rewards/margins"] != 0.0
    # The reference is the same model with adapters disabled: equal to the plain base's log-probs.
    tuned = ember.load_model(setup["base"], adapter=result.outputs["adapter"])
    assert all(isinstance(m, LoRALinear) for n, m in tuned.named_modules() if n.endswith("q_proj"))
    base = ember.load_model(setup["base"])
    pairs = load_preference_pairs(setup["dpo_val"], chatml_tokenizer(), 192)[:4]
    batch = pair_batch(pairs, chatml_tokenizer().pad_token_id)
    with torch.no_grad(), adapters_disabled(tuned):
        ref = torch.cat(pair_logprobs(tuned, batch))
    with torch.no_grad():
        assert torch.allclose(ref, torch.cat(pair_logprobs(base, batch)), atol=1e-4)
        objective = DPOObjective(beta=0.1, loss_type="sigmoid", label_smoothing=0.0)
        _, chosen, rejected = objective.rewards(tuned, batch)
    assert chosen.abs().sum() > 0


def test_full_dpo_precomputes_the_reference(setup) -> None:
    result = dpo(DPOConfig(base=setup["base"], data=setup["dpo_train"], val_fraction=0.2,
                           out=setup["root"] / "dpo_full", method="full", loss_type="ipo", lr=1e-4, max_steps=3,
                           batch_size=4, micro_batch_size=4, **FAST))
    # Before training the policy is the reference (up to batch-padding rounding).
    assert abs(result.val_before["val_rewards/margins"]) < 1e-5
    assert abs(result.val_after["val_rewards/margins"]) > 1e-3 and "model" in result.outputs


def test_malformed_line_through_the_cli_is_one_line(setup, tmp_path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "hi", "output": "yo"}\n{"instruction": "hi", "output": \n')
    proc = subprocess.run([sys.executable, "-m", "ember", "finetune", "--base", str(setup["base"]), "--data", str(bad),
                           "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and "bad.jsonl:2: not valid JSON" in proc.stderr, proc.stderr


@pytest.mark.parametrize("run, content, needle", [
    (finetune, '{"instruction": "hi", "output": ""}\n', "bad.jsonl has no usable example"),
    (dpo, '{"prompt": "hi", "chosen": "yo"}\n', "bad.jsonl:1: preference records need"),
    (dpo, "\n", "bad.jsonl has no usable preference pair"),
])
def test_unusable_data_is_an_error_not_an_empty_run(setup, tmp_path, run, content, needle) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    cls = FinetuneConfig if run is finetune else DPOConfig
    with pytest.raises(DataSourceError, match=needle):
        run(cls(base=setup["base"], data=bad, out=tmp_path / "run", **FAST))
    assert not (tmp_path / "run").exists()


def test_qlora_trains_on_an_nf4_base_and_saves_a_peft_adapter(setup, capsys) -> None:
    from ember.quant.linear import NF4Linear

    out = setup["root"] / "qlora"
    result = finetune(FinetuneConfig(base=setup["base"], data=setup["sft_train"], val_data=setup["sft_val"], out=out,
                                     method="qlora", lora_targets=["all-linear"], lora_r=16, lr=3e-3, max_steps=12,
                                     batch_size=8, micro_batch_size=8, pack=True, **FAST))
    printed = capsys.readouterr().out
    per_weight = float(printed.split("MiB = ")[1].split(" byte/weight")[0])
    assert 0.5 <= per_weight < 0.55  # 4-bit codes + double-quantized constants
    steps = [r["loss"] for r in _records(out / "metrics.jsonl") if "loss" in r]
    assert sum(steps[-3:]) / 3 < sum(steps[:3]) / 3  # the loss falls
    assert result.val_after["val_loss"] < result.val_before["val_loss"]
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and len(config["target_modules"]) == 7
    # The adapter applies to the full-precision base as well (how QLoRA adapters are served).
    model = ember.load_model(setup["base"], adapter=out / "adapter")
    assert not any(isinstance(m, NF4Linear) for m in model.modules())
