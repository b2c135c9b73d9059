"""A pipeline stage's runner: its layers over micro-batches of the step, activations sent to the
next stage point to point, logits sent back to rank 0.

    stage 0 (rank 0 leads)        stage 1                      ...  last stage
    mb 0: embed, layers  --isend-->  mb 0: recv, layers  --isend-->  mb 0: layers, norm, head
    mb 1: embed, layers  --isend-->  mb 1: ...                       logits --isend--> rank 0
    recv each mb's logits <--------------------------------------------------------------'

The step's sequences are cut into up to `pp` micro-batches of about equal tokens (attention never
crosses sequences, so each is a forward of its own over the same block pool); sends are
asynchronous, so while stage 1 computes micro-batch 0, stage 0 computes micro-batch 1. Each rank
of a stage sends its (replicated) activations to the rank holding the same tensor-parallel slice
in the next stage, so TP x PP combine. With one stage, the ModelRunner's own forward runs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ember.engine.attn_metadata import AttnMetadata
from ember.engine.model_runner import ModelRunner, StepInputs
from ember.model.transformer import Transformer
from ember.parallel.group import ParallelGroup


def micro_batches(step: StepInputs, parts: int) -> list[tuple[int, int, int, int]]:
    """(first sequence, end sequence, first token, end token) of each micro-batch: consecutive
    sequences, cut where the running token count passes each 1/parts of the total."""
    total = len(step.ids)
    out, seq0, tok0, tok = [], 0, 0, 0
    for i, (_, _, n) in enumerate(step.seqs):
        tok += n
        if tok * parts >= total * (len(out) + 1) or i == len(step.seqs) - 1:
            out.append((seq0, i + 1, tok0, tok))
            seq0, tok0 = i + 1, tok
    return out


class StageRunner(ModelRunner):
    """The ModelRunner of one rank of a parallel engine (the model is its shard)."""

    def __init__(self, group: ParallelGroup, model: Transformer, num_blocks: int, block_size: int,
                 kv_dtype: torch.dtype | None, int8_activations: bool) -> None:
        super().__init__(model, num_blocks, block_size, kv_dtype, int8_activations)
        self.group = group

    @torch.inference_mode()
    def run(self, step: StepInputs) -> torch.Tensor | None:
        g = self.group
        if g.pp == 1:
            return super().run(step)
        self.prepare(step)
        first, last = g.stage == 0, g.stage == g.pp - 1
        model = self.model
        D = model.config.hidden_size
        sends: list[dist.Work] = []
        mbs = micro_batches(step, g.pp)
        for k, (s0, s1, t0, t1) in enumerate(mbs):
            ids = torch.tensor([step.ids[t0:t1]], device=self.device)
            positions = torch.tensor([step.pos[t0:t1]], device=self.device)
            meta = AttnMetadata.build(self.kv_cache, self.block_size, step.seqs[s0:s1], self.workspace)
            if first:
                x = model.embed(ids)
            else:
                x = torch.empty(1, t1 - t0, D, dtype=self.dtype, device=self.device)
                dist.recv(x, src=g.stage_rank(g.stage - 1), tag=k)
            x = self._layers(x, positions, meta)
            if not last:
                sends.append(dist.isend(x.contiguous(), dst=g.stage_rank(g.stage + 1), tag=k))
                continue
            rows = [r - t0 for r in step.rows if t0 <= r < t1]
            if rows:
                h = model.model.norm(x)[0][torch.tensor(rows, device=self.device)]
                logits = model.logits(h).float().contiguous()
                if g.tp_rank == 0:
                    sends.append(dist.isend(logits, dst=0, tag=k))
        for work in sends:
            work.wait()
        if g.rank != 0 or not step.rows:
            return None
        out = torch.empty(len(step.rows), model.config.vocab_size, device=self.device)
        for k, (_, _, t0, t1) in enumerate(mbs):
            at = [i for i, r in enumerate(step.rows) if t0 <= r < t1]
            if at:
                buf = torch.empty(len(at), model.config.vocab_size, device=self.device)
                dist.recv(buf, src=g.stage_rank(g.pp - 1) - g.tp_rank, tag=k)
                out[torch.tensor(at, device=self.device)] = buf
        return out

    def _layers(self, x: torch.Tensor, positions: torch.Tensor, meta: AttnMetadata) -> torch.Tensor:
        """This stage's blocks, as Transformer.hidden runs them."""
        model = self.model
        cos_sin, local = model.rope(positions, x.dtype)
        for layer in model.model.layers:
            x, _ = layer(x, local if layer.self_attn.local_rope else cos_sin, meta)
        return x
