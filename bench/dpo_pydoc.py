"""DPO on the quickstart's pydoc preference pairs: held-out reward accuracy per seed (the README's dpo figures).

    PYTHONPATH=. python bench/dpo_pydoc.py                          # 600-step base, seeds 0 and 1
    PYTHONPATH=. python bench/dpo_pydoc.py --pretrain-steps 150     # the quickstart's own base

The recipe is the quickstart's, stage for stage (its tokenizer, the quickstart-10m model, LoRA SFT
on the pydoc QA pairs, merged), with a longer pretraining (`--pretrain-steps`, the quickstart's
default being 150); then one DPO run per `--seeds` on that SFT model: LoRA r16 on all linear
layers, lr 1.5e-3, beta 0.1, 300 steps of 8 pairs (`ember.commands.dpo.quickstart_dpo_config`).
The seed changes the adapter's initialisation and the order of the pairs, not the split: the
held-out pairs (questions from held-out documentation sections, rejecteds drawn from held-out
sections only) are the same for every seed. The baseline is the SFT model itself, printed as the
held-out reward accuracy before DPO: there the policy is the reference, every reward is 0 and no
pair counts as won (accuracy is the fraction with chosen strictly above rejected), so it reads 0.00.

This measures quality, not speed: the figures do not depend on machine load, only the run time does.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ember.commands.dpo import quickstart_dpo_config
from ember.commands.finetune import stage_finetune
from ember.commands.quickstart import QuickstartConfig, QuickstartState, stage_model, stage_pretrain, stage_tokenizer
from ember.train.dpo import dpo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/bench-dpo"))
    ap.add_argument("--pretrain-steps", type=int, default=600)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    state = QuickstartState(QuickstartConfig(out=args.out, pretrain_steps=args.pretrain_steps))
    for stage in (stage_tokenizer, stage_model, stage_pretrain, stage_finetune):
        print(f"[{stage.__name__.removeprefix('stage_')}]", flush=True)
        stage(state)
    rows = []
    for seed in args.seeds:
        print(f"[dpo seed {seed}]", flush=True)
        result = dpo(quickstart_dpo_config(state, args.out / f"dpo-seed{seed}", seed=seed, merged=False))
        rows.append((seed, result.val_before["val_accuracy"], result.val_after["val_accuracy"],
                     result.val_after["val_rewards/margins"], result.train.step))
    minutes = (time.perf_counter() - start) / 60
    print(f"\nquickstart-10m pretrained {args.pretrain_steps} steps, LoRA SFT 150 steps; DPO LoRA r16 all-linear, "
          f"lr 1.5e-3, beta 0.1, {args.threads} thread(s); {minutes:.1f} min in all")
    print(f"{'seed':>4}  {'steps':>5}  {'held-out acc before':>19}  {'after':>5}  {'margin':>6}")
    for seed, before, after, margin, steps in rows:
        print(f"{seed:>4}  {steps:>5}  {before:>19.2f}  {after:>5.2f}  {margin:>6.2f}")


if __name__ == "__main__":
    main()
