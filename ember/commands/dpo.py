"""Preference tuning: `ember dpo --base DIR --data FILE` (DPO, or IPO with --loss-type ipo).

    ember dpo --base runs/quickstart/finetune/model --data prefs.jsonl --beta 0.1 --max-steps 100
    ember dpo --base BASE --adapter runs/sft/adapter --data prefs.jsonl   # SFT adapter merged first

Records are {"prompt", "chosen", "rejected"} jsonl (strings or message lists). The reference
model is the base itself: with LoRA the same weights with adapters disabled. Each step logs
rewards/chosen, rewards/rejected, rewards/margins and rewards/accuracies to <out>/metrics.jsonl;
the adapter is saved in PEFT format to <out>/adapter. Also the quickstart's dpo stage (`stage_dpo`).
"""

from __future__ import annotations

from pathlib import Path

from ember.commands.finetune import quickstart_tuning
from ember.train.dpo import DPOConfig, dpo


def main(cfg: DPOConfig) -> None:
    result = dpo(cfg)
    before, after = result.val_before.get("val_accuracy"), result.val_after.get("val_accuracy")
    if before is not None and after is not None:
        margin = result.val_after.get("val_rewards/margins", float("nan"))
        print(f"held-out reward accuracy {before:.2f} -> {after:.2f} (margin {margin:.3f}) "
              f"after {result.train.step} steps")
    for kind, path in result.outputs.items():
        print(f"{kind} saved to {path}")


CONFIG = DPOConfig


def quickstart_dpo_config(state, out: Path, seed: int | None = None, merged: bool = True) -> DPOConfig:
    """The quickstart's DPO run on its pydoc preference pairs (also bench/dpo_pydoc.py's, per seed)."""
    t = quickstart_tuning(state)
    settings = {**t["settings"], "merged": merged}
    if seed is not None:
        settings["seed"] = seed
    return DPOConfig(base=state.model_dir, data=t["sets"]["dpo_train"], val_data=t["sets"]["dpo_val"], out=out,
                     lr=1.5e-3, beta=0.1, max_steps=3 if state.cfg.fast else 300, **settings)


def stage_dpo(state) -> None:
    """Quickstart stage: DPO with LoRA on the pydoc preference pairs; the merged model becomes the latest."""
    assert state.model_dir is not None, "the finetune stage has not run"
    result = dpo(quickstart_dpo_config(state, state.cfg.out / "dpo"))
    state.model_dir, state.model_label = result.outputs["model"], "dpo"
    state.measure("dpo", state.model_dir)
    print(f"  held-out reward accuracy {result.val_before['val_accuracy']:.2f} -> "
          f"{result.val_after['val_accuracy']:.2f} (margin {result.val_after['val_rewards/margins']:.3f}); "
          f"adapter (PEFT) in {result.outputs['adapter']}")
