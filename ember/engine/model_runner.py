"""ModelRunner: one forward of the ONE Transformer per engine step, over the flattened batch.

    SchedulerOutput (requests, tokens each)      flatten
      -> input_ids (1, N), positions (1, N), AttnMetadata (slots, block tables, lengths)
      -> Transformer.hidden(...)                 every layer reads/writes K/V in the block pool
      -> lm_head only on the rows that need logits:
           the last token of each request that is sampled this step, and the prompt positions
           of requests that asked for prompt_logprobs
The pool is allocated here from the number of blocks the engine sized (ember/engine/config.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ember.engine.attn_metadata import AttnMetadata, Workspace, allocate_kv_cache
from ember.engine.fused_layer import DecodeStack
from ember.engine.kv_cache import KVCacheManager
from ember.engine.request import Request
from ember.engine.scheduler import SchedulerOutput
from ember.engine.weight_layout import relayout_for_decode
from ember.model.transformer import Transformer


@dataclass
class PromptLogits:
    """Logits (m, vocab) of consecutive prompt positions and the prompt tokens they predict."""

    request: Request
    logits: torch.Tensor
    targets: list[int]


@dataclass
class StepInputs:
    """What one forward needs, host-side: block copies, the flattened tokens and positions, each
    sequence's (block table, computed tokens, new tokens), blocks written for the first time
    (zeroed first) and the rows that need logits."""

    block_copies: list[tuple[int, int]]
    ids: list[int] = field(default_factory=list)
    pos: list[int] = field(default_factory=list)
    seqs: list[tuple[list[int], int, int]] = field(default_factory=list)
    fresh: list[int] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)


@dataclass
class ModelOutput:
    sample_requests: list[Request] = field(default_factory=list)
    logits: torch.Tensor | None = None  # (len(sample_requests), vocab) float32
    prompt_logits: list[PromptLogits] = field(default_factory=list)


class ModelRunner:
    """Owns the model, the KV block pool and the gather workspace."""

    def __init__(self, model: Transformer, num_blocks: int, block_size: int,
                 kv_dtype: torch.dtype | None = None, int8_activations: bool = False) -> None:
        self.model = model.eval()
        relayout_for_decode(model)  # faster batch-1 matmuls on CPU; same values (weight_layout.py)
        from ember.quant.base import QuantLinear  # ember.quant imports the package root, which imports this

        for module in model.modules():  # the engine's choice for its model (EngineConfig.int8_activations)
            if isinstance(module, QuantLinear):
                module.int8_activations = int8_activations
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.block_size = block_size
        self.kv_cache = allocate_kv_cache(model.config, num_blocks, block_size, kv_dtype or p.dtype, p.device)
        self.workspace = Workspace()
        self.stack = DecodeStack(model)
        # Masked keys still enter SDPA's weighted sum (weight 0): never-written memory could hold
        # NaN, so a block is zeroed the first time it is written.
        self.initialized = bytearray(num_blocks)  # host-side: decode steps then run no device op for it

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, kv: KVCacheManager) -> ModelOutput:
        bs = self.block_size
        step = StepInputs(list(out.block_copies))
        result = ModelOutput()
        sample_rows: list[int] = []
        prompt_spans: list[tuple[Request, int, int, list[int]]] = []
        initialized = self.initialized
        for src, dst in out.block_copies:  # copy-on-write targets hold data once copied
            initialized[dst] = 1
        row = 0
        for req, n in zip(out.requests, out.num_tokens):
            c = req.num_computed_tokens
            step.ids.extend(req.token_ids[c:c + n])
            step.pos.extend(range(c, c + n))
            table = kv.block_table(req.request_id)
            step.seqs.append((table, c, n))
            for b in table[c // bs:(c + n - 1) // bs + 1]:
                if not initialized[b]:
                    initialized[b] = 1
                    step.fresh.append(b)
            if req.prompt_logprobs is not None:
                # Position p predicts token p + 1; prompt_logprobs already covers tokens < len().
                lo, hi = max(c, len(req.prompt_logprobs) - 1), min(c + n, req.num_prompt_tokens - 1)
                if hi > lo:
                    prompt_spans.append((req, row + lo - c, row + hi - c, req.token_ids[lo + 1:hi + 1]))
            if c + n == req.num_tokens:
                sample_rows.append(row + n - 1)
                result.sample_requests.append(req)
            row += n
        step.rows = sample_rows + [r for _, lo, hi, _ in prompt_spans for r in range(lo, hi)]
        logits = self.run(step)
        if logits is None:
            return result
        result.logits = logits[:len(sample_rows)]
        at = len(sample_rows)
        for req, lo, hi, targets in prompt_spans:
            result.prompt_logits.append(PromptLogits(req, logits[at:at + hi - lo], targets))
            at += hi - lo
        return result

    @torch.inference_mode()
    def run(self, step: StepInputs) -> torch.Tensor | None:
        """The step's forward on this runner's model and pool: fp32 logits (len(step.rows), vocab),
        or None when no row needs them. Every rank of a parallel engine runs this with the same
        step (ember/parallel/runner.py)."""
        self.prepare(step)
        input_ids = torch.tensor([step.ids], device=self.device)
        positions = torch.tensor([step.pos], device=self.device)
        meta = AttnMetadata.build(self.kv_cache, self.block_size, step.seqs, self.workspace)
        h = self.stack.hidden(input_ids, positions, meta)  # decode-only steps, when it can: one native call
        if h is None:
            h, _ = self.model.hidden(input_ids, positions, meta)
        h = h[0]  # (N, D)
        rows = step.rows
        if not rows:
            return None
        if rows != list(range(h.shape[0])):  # (a decode-only step samples every row, in order)
            h = h[torch.tensor(rows, device=self.device)]
        return self.model.logits(h).float()

    def prepare(self, step: StepInputs) -> None:
        """The step's block-pool changes before any layer writes: copies of forked blocks, and
        zeros in blocks used for the first time."""
        for src, dst in step.block_copies:  # copy-on-write of blocks shared by a fork
            self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]
        if step.fresh:
            self.kv_cache[:, :, torch.tensor(step.fresh, device=self.device)] = 0
