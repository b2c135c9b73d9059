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

from pathlib import Path

import torch

from ember.checkpoint.hf import load_model
from ember.tokenizer import load_tokenizer
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


def held_out_perplexity(state, model_dir: Path) -> float:
    """Token perplexity on the bundled held-out documents, as the quantize stage measures it."""
    from ember.eval.perplexity import model_perplexity
    from ember.quant.report import heldout_texts

    fast = state.cfg.fast
    tok = load_tokenizer(model_dir)
    texts = heldout_texts(tok, ["bundled"], 2_000 if fast else 20_000)
    with torch.no_grad():
        return model_perplexity(load_model(model_dir), tok, texts, max_len=128 if fast else 512).token_perplexity


def stage_finetune(state) -> None:
    """Quickstart stage: LoRA SFT on the pydoc QA set; the merged model becomes the latest."""
    assert state.model_dir is not None, "the model stage has not run"
    t = quickstart_tuning(state)
    result = finetune(FinetuneConfig(base=state.model_dir, data=t["sets"]["sft_train"], val_data=t["sets"]["sft_val"],
                                     out=state.cfg.out / "finetune", lr=1e-3, max_steps=3 if state.cfg.fast else 150,
                                     pack=True, **t["settings"]))
    state.model_dir = result.outputs["model"]
    state.perplexity["finetuned"] = held_out_perplexity(state, state.model_dir)
    print(f"  held-out assistant-token loss {result.val_before['val_loss']:.3f} -> {result.val_after['val_loss']:.3f}; "
          f"adapter (PEFT) in {result.outputs['adapter']}, merged model in {state.model_dir}")
