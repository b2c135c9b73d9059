"""Supervised fine-tuning on chat data: `ember finetune --base DIR --data FILE [--method lora|qlora|full]`.

    ember finetune --base runs/quickstart/base --data chat.jsonl --max-steps 200
    ember finetune --base DIR --data alpaca.jsonl --method qlora --lora-targets all-linear --pack
    ember finetune --config configs/finetune-qlora.yaml --base DIR --data FILE

Records are Alpaca (instruction/input/output), OpenAI `messages` or ShareGPT `conversations`
jsonl, rendered with the base's chat template; only assistant tokens carry loss. Rerunning the
same command resumes from the newest checkpoint in --out. The adapter is saved in PEFT format to
<out>/adapter (use it with `ember generate --model BASE --adapter <out>/adapter`); --method full
saves the model to <out>/model. Also the quickstart's finetune stage (`stage_finetune`).
"""

from __future__ import annotations

from ember.train.sft import FinetuneConfig, finetune


def main(cfg: FinetuneConfig) -> None:
    result = finetune(cfg)
    before, after = result.val_before.get("val_loss"), result.val_after.get("val_loss")
    if before is not None and after is not None:
        print(f"held-out assistant-token loss {before:.3f} -> {after:.3f} after {result.train.step} steps")
    for kind, path in result.outputs.items():
        print(f"{kind} saved to {path}")


CONFIG = FinetuneConfig


def quickstart_tuning(state) -> dict:
    """The pydoc QA sets and the settings the quickstart's finetune and dpo stages share."""
    from ember.data.pydoc_qa import write_pydoc_sets

    fast = state.cfg.fast
    sets = write_pydoc_sets(state.cfg.out / "pydoc_qa", seed=state.cfg.seed, max_sections=24 if fast else None)
    settings = dict(lora_targets=["all-linear"], lora_r=16, lora_alpha=32.0, lora_dropout=0.0, max_len=256,
                    batch_size=8, micro_batch_size=8, merged=True, eval_every=0, save_every=0, resume=False,
                    progress=not fast, seed=state.cfg.seed, warmup_steps=2 if fast else 10)
    return {"sets": sets, "settings": settings}


def stage_finetune(state) -> None:
    """Quickstart stage: LoRA SFT on the pydoc QA set; the merged model becomes the latest."""
    assert state.model_dir is not None, "the model stage has not run"
    t = quickstart_tuning(state)
    result = finetune(FinetuneConfig(base=state.model_dir, data=t["sets"]["sft_train"], val_data=t["sets"]["sft_val"],
                                     out=state.cfg.out / "finetune", lr=1e-3, max_steps=3 if state.cfg.fast else 150,
                                     pack=True, **t["settings"]))
    state.model_dir, state.model_label = result.outputs["model"], "finetuned"
    state.measure("finetuned", state.model_dir)
    print(f"  held-out assistant-token loss {result.val_before['val_loss']:.3f} -> {result.val_after['val_loss']:.3f}; "
          f"adapter (PEFT) in {result.outputs['adapter']}, merged model in {state.model_dir}")


def stage_real_finetune(state) -> None:
    """Quickstart stage: a short LoRA SFT of the real model on the same pydoc QA pairs (adapter only).

    The real model already answers questions; a few steps start to teach it the dataset's answer form
    (the section title, then the documentation's first sentences). Its merged weights are not
    saved (the adapter is 20 MB against 540 MB), and the stages after it keep the untuned model.
    """
    real = state.real_model()
    if real is None:
        return
    fast = state.cfg.fast
    t = quickstart_tuning(state)
    # A step of 4 packed rows of 128 tokens costs ~10 s on two cores (forward and backward through
    # all 30 layers), so the full run takes 12 steps (~100 of the ~400 training pairs), at a rate
    # high enough for so few steps to move the loss.
    settings = {**t["settings"], "merged": False, "max_len": 128, "batch_size": 2 if fast else 4,
                "micro_batch_size": 2 if fast else 4, "warmup_steps": 0 if fast else 2}
    result = finetune(FinetuneConfig(base=real.file, data=t["sets"]["sft_train"], val_data=t["sets"]["sft_val"],
                                     out=state.cfg.out / f"{real.name}-finetune", lr=1e-3,
                                     max_steps=1 if fast else 12, pack=True, **settings))
    print(f"  held-out assistant-token loss {result.val_before['val_loss']:.3f} -> {result.val_after['val_loss']:.3f} "
          f"after {result.train.step} steps; adapter (PEFT) in {result.outputs['adapter']}, for "
          f"`ember generate --model {real.name} --adapter {result.outputs['adapter']}`")
