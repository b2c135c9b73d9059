"""Every fine-tuning YAML preset in configs/ loads into its verb's config."""

from __future__ import annotations

from pathlib import Path

import pytest

from ember.adapters.lora import LoRAConfig
from ember.cliconfig import parse_config
from ember.train.dpo import DPOConfig
from ember.train.sft import FinetuneConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name, cls", [("finetune-qlora.yaml", FinetuneConfig), ("dpo-lora.yaml", DPOConfig)])
def test_preset_loads(name: str, cls: type) -> None:
    cfg = parse_config(cls, ["--config", str(CONFIGS / name), "--base", "b", "--data", "d.jsonl"], "ember")
    assert cfg.base == Path("b") and cfg.data == Path("d.jsonl")
    assert cfg.lora() == LoRAConfig(r=16, alpha=32.0, dropout=cfg.lora_dropout, targets="all-linear")
    assert cfg.accum_steps(world=1) >= 1
