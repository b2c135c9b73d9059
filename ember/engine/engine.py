"""LLMEngine: requests in, one scheduled forward per step, vLLM-shaped outputs out.

    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=32))
    engine.add_request("a", "Once upon a time", SamplingParams(max_tokens=32))
    while engine.has_unfinished():
        for out in engine.step(): ...           # RequestOutput per request that changed

One step (docs/architecture.md §4):
    Scheduler.schedule()        token budget, running first, prefix-cache hits, preemption
    TokenMasker.start()         masks of the constrained requests sampled this step, computed on a
                                background thread while the forward runs (token_mask.py)
    ModelRunner.execute()       flattened forward over the paged KV cache -> logits
    fork n > 1 groups           children share the prompt's blocks, each samples its own token
    Sampler                     token masks, penalties, filters, seeded draws, logprobs
    append + stop checks        matcher advanced; EOS / stop_token_ids / stop strings (Detokenizer) /
                                length / a grammar that is complete (nothing but EOS can follow)
A request added with stream=True yields a delta output every step it changes (the async
engine's streams); otherwise one cumulative output when it finishes (LLM.generate).
`stats()` is what a metrics exporter reads.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from ember.engine.config import EngineConfig, EngineConfigError, log_capacity, num_kv_blocks
from ember.engine.detokenizer import Detokenizer
from ember.engine.grammar import GrammarCompiler
from ember.engine.kv_cache import KVCacheManager
from ember.engine.kv_offload import KVOffloadTier
from ember.engine.model_runner import ModelRunner
from ember.engine.request import CompletionOutput, Request, RequestMetrics, RequestOutput, RequestStatus
from ember.engine.sampler import Sampler
from ember.engine.sampling_params import SamplingParams, SamplingParamsError
from ember.engine.scheduler import Scheduler, SchedulerOutput
from ember.engine.token_mask import TokenMasker
from ember.errors import EmberError
from ember.model.generate import stop_token_ids
from ember.model.transformer import Transformer
from ember.tokenizer import Tokenizer

log = logging.getLogger("ember.engine")


class RequestError(EmberError):
    """A request the engine cannot serve (too long, duplicate id, text without a tokenizer)."""


@dataclass
class EngineStats:
    """A snapshot of the engine's gauges and counters (tokens count, not requests, for the cache)."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of blocks held by requests
    num_kv_blocks: int
    prefix_cache_queries: int  # prompt tokens looked up
    prefix_cache_hits: int  # prompt tokens found cached
    num_preemptions: int
    prompt_tokens_total: int
    generation_tokens_total: int
    num_requests_finished: int
    kv_offload: OffloadStats | None = None  # None without an offload tier


@dataclass
class OffloadStats:
    """Counters of the KV offload tier (blocks, not tokens)."""

    usage: float  # fraction of the tier's slots holding a block
    num_slots: int
    stored_prefix_blocks: int  # evicted prefix-cache blocks copied in
    stored_swap_blocks: int  # blocks of preempted sequences copied in
    restored_prefix_blocks: int  # prefix hits copied back into the pool
    restored_swap_blocks: int  # swapped sequences' blocks copied back
    dropped_blocks: int  # prefix blocks dropped from a full tier (LRU)
    swapped_sequences: int  # preemptions that swapped instead of recomputing


class RequestGroup:
    """The n sequences of one user request and what of them was already sent (streaming)."""

    def __init__(self, request_id: str, prompt: str | None, seq: Request, stream: bool) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.seqs: list[Request] = [seq]
        self.stream = stream
        self.aborted = False
        # index -> [chars, tokens, logprobs] already streamed, and whether its final delta went out
        self.sent: dict[int, list] = {}
        self.prompt_logprobs_sent = False

    @property
    def finished(self) -> bool:
        done = len(self.seqs) == self.seqs[0].params.n and all(s.finished for s in self.seqs)
        return done or self.aborted

    def metrics(self) -> RequestMetrics:
        first = self.seqs[0].metrics
        starts = [s.metrics.first_token_time for s in self.seqs if s.metrics.first_token_time is not None]
        lasts = [s.metrics.last_token_time for s in self.seqs if s.metrics.last_token_time is not None]
        ends = [s.metrics.finished_time for s in self.seqs if s.metrics.finished_time is not None]
        return RequestMetrics(
            arrival_time=first.arrival_time, first_scheduled_time=first.first_scheduled_time,
            first_token_time=min(starts, default=None), last_token_time=max(lasts, default=None),
            finished_time=max(ends) if self.finished and ends else None,
            num_prompt_tokens=first.num_prompt_tokens,
            num_generation_tokens=sum(s.num_output_tokens for s in self.seqs),
            num_cached_tokens=first.num_cached_tokens,
            num_preemptions=sum(s.metrics.num_preemptions for s in self.seqs))

    def output(self) -> RequestOutput:
        """Cumulative output, or for a stream the parts not sent yet (text held back near stops)."""
        outs = []
        for seq in self.seqs:
            text = seq.detokenizer.streamable(seq.finished) if seq.detokenizer is not None else ""
            tokens, lps = seq.output_token_ids, seq.logprobs
            if self.stream:
                chars, ntok, nlp, final = self.sent.get(seq.index, (0, 0, 0, False))
                if final or (len(tokens) == ntok and len(text) == chars and not seq.finished):
                    continue
                self.sent[seq.index] = [len(text), len(tokens), len(lps or ()), seq.finished]
                text, tokens, lps = text[chars:], tokens[ntok:], (lps[nlp:] if lps is not None else None)
            outs.append(CompletionOutput(seq.index, text, tokens,
                                         seq.cumulative_logprob if seq.logprobs is not None else None,
                                         lps, seq.finish_reason, seq.stop_reason))
        first = self.seqs[0]
        prompt_lps = first.prompt_logprobs
        if self.stream:  # sent once, complete, with the first generated token
            ready = first.num_output_tokens > 0 and not self.prompt_logprobs_sent
            prompt_lps = prompt_lps if ready else None
            self.prompt_logprobs_sent |= ready
        return RequestOutput(self.request_id, self.prompt, first.prompt_token_ids, prompt_lps, outs,
                             self.finished, self.metrics(), first.metrics.num_cached_tokens)


class LLMEngine:
    """The synchronous engine; see the module docstring."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer | None = None,
                 config: EngineConfig | None = None) -> None:
        self.config = cfg = config or EngineConfig()
        self.model = model
        self.tokenizer = tokenizer
        group = None
        if cfg.world_size > 1:  # rank 0's model becomes its shard (ember/parallel)
            from ember.parallel.runner import start_parallel

            group = start_parallel(model, cfg)
        mcfg = model.config
        p = next(model.parameters())
        kv_dtype = cfg.cache_dtype(p.dtype)
        blocks = num_kv_blocks(cfg, mcfg, kv_dtype, p.device)
        self.max_model_len = cfg.max_model_len or mcfg.max_position_embeddings
        self.pool_tokens = blocks * cfg.block_size
        if not cfg.enable_chunked_prefill and cfg.max_num_batched_tokens < self.max_model_len:
            raise EngineConfigError(
                f"without chunked prefill, max_num_batched_tokens ({cfg.max_num_batched_tokens}) must be >= "
                f"max_model_len ({self.max_model_len}) so every prompt fits one step")
        self.kv = KVCacheManager(blocks, cfg.block_size, cfg.enable_prefix_caching)
        if group is None:
            self.runner = ModelRunner(model, blocks, cfg.block_size, kv_dtype, cfg.int8_activations)
        else:
            from ember.parallel.runner import ParallelModelRunner

            self.runner = ParallelModelRunner(group, model, blocks, cfg.block_size, kv_dtype,
                                              cfg.int8_activations, cfg.distributed_timeout)
        if cfg.kv_offload_gb > 0:
            self.kv.offload = KVOffloadTier.sized(self.runner.kv_cache, self.runner.initialized,
                                                  cfg.kv_offload_gb, cfg.kv_offload_dir)
            log.info("KV offload tier: %d blocks in %s", self.kv.offload.num_slots, self.kv.offload.where)
        self.scheduler = Scheduler(self.kv, cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.enable_chunked_prefill)
        self.eos_token_ids = stop_token_ids(mcfg, tokenizer.eos_token_id if tokenizer else None)
        decode = (lambda t: tokenizer.decode([t])) if tokenizer is not None else None
        self.sampler = Sampler(mcfg.vocab_size, self.eos_token_ids, cfg.seed, decode)
        self.grammars = GrammarCompiler(tokenizer, mcfg.vocab_size, sorted(self.eos_token_ids))
        self.masker = TokenMasker(mcfg.vocab_size)
        self.groups: dict[str, RequestGroup] = {}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.num_requests_finished = 0
        log_capacity(model, blocks, cfg.block_size, self.max_model_len,
                     self.runner.kv_cache.numel() * self.runner.kv_cache.element_size(), kv_dtype)

    # ---- requests ------------------------------------------------------------------------------
    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("this engine has no tokenizer: pass prompt token ids, or load a tokenizer")
            return self.tokenizer.encode(prompt)
        ids = [int(t) for t in prompt]
        bad = [t for t in ids if not 0 <= t < self.model.config.vocab_size]
        if bad:
            raise RequestError(f"prompt token id(s) {bad[:5]} outside the vocabulary of {self.model.config.vocab_size}")
        return ids

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> int:
        """Raise a clear error if the request cannot be served; else its max_tokens after capping."""
        if not isinstance(params, SamplingParams):
            raise SamplingParamsError(f"expected SamplingParams, got {type(params).__name__}")
        params.check_vocab(self.model.config.vocab_size)
        if params.structured_outputs is not None:
            self.grammars.compile(params.structured_outputs)  # GrammarError (a 400) before queueing
        if not prompt_ids:
            raise RequestError("the prompt is empty: give at least one token")
        if params.stop_strings and self.tokenizer is None:
            raise RequestError("stop strings need a tokenizer; use stop_token_ids instead")
        n = len(prompt_ids)
        if n >= self.max_model_len:
            raise RequestError(f"the prompt has {n} tokens but the model's context (max_model_len) is "
                               f"{self.max_model_len}: shorten the prompt")
        if n >= self.pool_tokens:
            raise RequestError(f"the prompt has {n} tokens but the whole KV cache holds {self.pool_tokens}: "
                               "shorten the prompt or raise kv_cache_memory")
        room = min(self.max_model_len, self.pool_tokens) - n
        return room if params.max_tokens is None else min(params.max_tokens, room)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    arrival_time: float | None = None, stream: bool = False) -> None:
        """Queue a request (text, or token ids); errors are raised here, before anything is queued."""
        if request_id in self.groups:
            raise RequestError(f"request id {request_id!r} is already in use")
        ids = self.tokenize(prompt)
        max_tokens = self.check_request(ids, params)
        seq = Request(request_id, ids, params, max_tokens, arrival_time)
        if self.tokenizer is not None:
            seq.detokenizer = Detokenizer(self.tokenizer, ids, params)
        if params.structured_outputs is not None:
            seq.matcher = self.grammars.compile(params.structured_outputs)
        self.groups[request_id] = RequestGroup(request_id, prompt if isinstance(prompt, str) else None, seq, stream)
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; its final output (finish_reason "abort"), if known."""
        group = self.groups.pop(request_id, None)
        if group is None:
            return None
        now = time.time()
        for seq in group.seqs:
            if not seq.finished:
                self.scheduler.finish(seq, RequestStatus.FINISHED_ABORTED)
                seq.metrics.finished_time = now
        group.aborted = True
        self.num_requests_finished += 1
        return group.output()

    def close(self) -> None:
        """Release what outlives the engine object: a parallel engine's worker ranks."""
        close = getattr(self.runner, "close", None)
        if close is not None:
            close()

    def has_unfinished(self) -> bool:
        return bool(self.groups)

    def stats(self) -> EngineStats:
        return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting), self.kv.usage,
                           self.kv.num_blocks, self.kv.prefix_queries, self.kv.prefix_hits,
                           self.scheduler.num_preemptions, self.prompt_tokens_total,
                           self.generation_tokens_total, self.num_requests_finished, self._offload_stats())

    def _offload_stats(self) -> OffloadStats | None:
        t = self.kv.offload
        if t is None:
            return None
        return OffloadStats(t.usage, t.num_slots, t.stored_prefix_blocks, t.stored_swap_blocks,
                            t.restored_prefix_blocks, t.restored_swap_blocks, t.dropped_blocks,
                            t.swapped_sequences)

    # ---- the step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        if out.empty:
            return []
        scheduled = time.time()
        for req in out.requests:
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = scheduled
        masks = self._start_masks(out)
        result = self.runner.execute(out, self.kv)
        self.scheduler.update_computed(out)
        now = time.time()
        for pl in result.prompt_logits:
            pl.request.prompt_logprobs.extend(
                self.sampler.prompt_logprobs(pl.logits, pl.targets, pl.request.params.prompt_logprobs))
        if masks is not None:  # before any fork: a fork copies a matcher the mask thread may still read
            masks = masks[0], masks[1].result()
        reqs, rows = [], []
        for i, req in enumerate(result.sample_requests):
            reqs.append(req)
            rows.append(i)
            if req.fork_pending:
                req.fork_pending = False
                group = self.groups[req.group_id]
                for j in range(1, req.params.n):
                    child = req.fork(j)
                    if req.detokenizer is not None:
                        child.detokenizer = Detokenizer(self.tokenizer, req.prompt_token_ids, req.params)
                    self.kv.fork(req, child)
                    self.scheduler.add_running(child)
                    group.seqs.append(child)
                    reqs.append(child)
                    rows.append(i)
        touched: dict[str, RequestGroup] = {}
        if reqs:
            logits = result.logits if len(rows) == result.logits.shape[0] else result.logits[torch.tensor(rows)]
            row_masks = None
            if masks is not None:  # fork children share their parent's row, and so its mask
                constrained, bitmask = masks
                at = {id(r): j for j, r in enumerate(constrained)}
                picks = [(k, at[id(result.sample_requests[i])]) for k, i in enumerate(rows)
                         if id(result.sample_requests[i]) in at]
                row_masks = ([k for k, _ in picks], bitmask[[j for _, j in picks]])
            for req, token in zip(reqs, self.sampler(logits, reqs, row_masks)):
                self._append(req, token, now)
                touched[req.group_id] = self.groups[req.group_id]
        outputs = []
        for gid, group in touched.items():
            if group.finished:
                del self.groups[gid]
                self.num_requests_finished += 1
            if group.stream or group.finished:
                outputs.append(group.output())
        return outputs

    def _start_masks(self, out: SchedulerOutput) -> tuple[list[Request], object] | None:
        """Masks of the constrained requests this step samples (it computes their last token)."""
        constrained = [req for req, n in zip(out.requests, out.num_tokens)
                       if req.matcher is not None and req.num_computed_tokens + n == req.num_tokens]
        if not constrained:
            return None
        return constrained, self.masker.start([req.matcher for req in constrained])

    def _append(self, req: Request, token: int, now: float) -> None:
        if req.num_output_tokens == 0 and req.index == 0:  # once per request, not per fork
            self.prompt_tokens_total += req.num_prompt_tokens
        req.append_token(token, now)
        self.generation_tokens_total += 1
        p = req.params
        checks = req.num_output_tokens >= p.min_tokens
        status = None
        done_grammar = False
        if req.matcher is not None:
            # The mask allowed the token, so it is accepted; False only after an all-masked row was
            # given EOS (a matcher in its error state): end the request rather than loop on it.
            accepted = req.matcher.consume_token(token)
            done_grammar = not accepted or req.matcher.is_stopped()
        if checks and (token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids)):
            status = RequestStatus.FINISHED_STOPPED
            req.stop_reason = token if token in p.stop_token_ids else None
        elif req.detokenizer is not None:
            stop = req.detokenizer.append(token, checks)
            if stop is not None:
                status, req.stop_reason = RequestStatus.FINISHED_STOPPED, stop
        if status is None and done_grammar:  # only EOS could follow (even with ignore_eos): stop now
            status = RequestStatus.FINISHED_STOPPED
        if status is None and (req.num_output_tokens >= req.max_tokens or req.num_tokens >= self.max_model_len):
            status = RequestStatus.FINISHED_LENGTH
        if status is not None:
            if req.detokenizer is not None and not isinstance(req.stop_reason, str):
                req.detokenizer.flush()
            self.scheduler.finish(req, status)
            req.metrics.finished_time = now
