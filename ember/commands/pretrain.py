"""Pretrain a model on text: `ember pretrain --config FILE.yaml [--flag value ...]`.

    ember pretrain --model quickstart-10m --tokenizer runs/tok --data bundled --max-steps 500
    ember pretrain --config configs/pretrain-quickstart.yaml --out runs/pt --max-steps 2000
    torchrun --nproc_per_node 2 -m ember pretrain --config configs/pretrain-quickstart.yaml --parallel fsdp

Rerunning the same command resumes from the newest checkpoint in --out. The final model is
saved in the Hugging Face layout (with its tokenizer) under <out>/model.
"""

from __future__ import annotations

from ember.train.pretrain import PretrainConfig, pretrain


def main(cfg: PretrainConfig) -> None:
    result = pretrain(cfg)
    if result.model_dir is not None:
        before, after = result.ppl_before, result.ppl_after
        print(f"validation perplexity {before:.1f} -> {after:.2f} after {result.train.step} steps "
              f"({result.train.skipped_steps} skipped); model saved to {result.model_dir}")


CONFIG = PretrainConfig
