"""ember.train: the shared training loop and what runs on it.

    loop.py         Trainer + TrainConfig: steps, accumulation, clipping, schedule, eval, checkpoints
    checkpoint.py   atomic DCP checkpoints with verification and fallback
    distributed.py  torchrun process groups, DDP / FSDP2 wrapping
    optim.py        AdamW parameter groups and the warmup + cosine schedule
    metrics.py      matmul peak (MFU), metrics.jsonl, loss-curve PNG
    pretrain.py     next-token pretraining on token shards (`ember pretrain`)
    scaling.py      Chinchilla Approach-3 fits and compute-optimal planning (`ember scaling`)
    sweep.py        grids of small pretraining runs for scaling fits
    lbfgs.py        batched L-BFGS used by the fits
"""
