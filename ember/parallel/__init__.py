"""Inference across processes: tensor parallel (Megatron splits of every block), expert parallel
(Mixtral's experts split across the same ranks), on torch.distributed (gloo on CPU, NCCL on GPUs).

Rank 0 runs the engine (scheduler, sampler, KV block bookkeeping) and broadcasts each step's
inputs; every rank runs the same forward on its shard of the model and its own KV pool, which
holds only its KV heads. Ranks are spawned by ember (torch.multiprocessing) or joined under
torchrun:

    LLM("smollm2-135m-instruct", tensor_parallel_size=2)            # spawns one worker process
    torchrun --nproc-per-node 2 -m ember serve --model M --tensor-parallel-size 2

    group.py    process group, spawning, torchrun detection (ParallelGroup)
    layers.py   the collectives inside the model: all-reduce hooks, vocab-parallel embedding and
                LM head, the expert-parallel MoE
    shard.py    cutting one rank's shard out of a loaded Transformer, in place
    runner.py   rank 0's runner (broadcast, heartbeat, watchdog) and the workers' loop
"""

from ember.parallel.group import ParallelError

__all__ = ["ParallelError"]
