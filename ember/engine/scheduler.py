"""Scheduler: continuous batching under a per-step token budget, chunked prefill, preemption.

Each step hands every scheduled request a number of its not-yet-computed tokens:

    budget = max_num_batched_tokens
    1. running requests, oldest first: 1 token for a decode, the next chunk for a prefill
       in progress. When the pool has no block left, the NEWEST running request is preempted
       (blocks freed, back to the front of the waiting queue, recomputed later; with an offload
       tier its blocks are swapped out first and back in when it returns, see kv_offload.py) until
       the current one fits: never a crash, never a deadlock, since one request alone always fits.
    2. then, unless someone was preempted this step, waiting requests in arrival order while
       budget, max_num_seqs and free blocks allow: leading blocks found in the prefix cache are
       shared (then those the offload tier holds are restored), the rest is computed (a chunk
       of at most the remaining budget when chunked prefill is on, otherwise the whole prompt
       or nothing).

A request is sampled in a step when that step computes its last known token (a decode, or
the final chunk of its prompt). Nothing here touches tensors; see kv_cache.py for the blocks.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ember.engine.kv_cache import KVCacheManager
from ember.engine.request import Request, RequestStatus


@dataclass
class SchedulerOutput:
    """One step's work: requests in batch order, tokens each computes, block copies to do first."""

    requests: list[Request] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    @property
    def empty(self) -> bool:
        return not self.requests


class Scheduler:
    """Owns the waiting queue and the running list; see the module docstring for the policy."""

    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 enable_chunked_prefill: bool) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.kv.allocate_slots(req, n):
                victim = self.running.pop()  # the newest; never one already scheduled this step
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            else:
                self.kv.cache_blocks(req, req.num_computed_tokens + n)
                out.requests.append(req)
                out.num_tokens.append(n)
                budget -= n
                i += 1
        while self.waiting and budget > 0 and not out.preempted:
            req = self.waiting[0]
            seqs = req.params.n if req.fork_pending else 1
            if len(self.running) + seqs > self.max_num_seqs and self.running:
                break
            swapped = self.kv.offload is not None and self.kv.offload.is_swapped(req.request_id)
            if swapped:  # preempted into the offload tier: its computed tokens come back as they were
                computed, restore, num_cached = [], [], req.num_computed_tokens
            else:
                computed = self.kv.get_computed_blocks(req)
                restore = self.kv.offloaded_prefix(req, len(computed))
                num_cached = (len(computed) + len(restore)) * self.kv.block_size
            n = req.num_tokens - num_cached
            if n > budget:
                if not self.enable_chunked_prefill:
                    break
                n = budget
            if not self.kv.allocate_slots(req, n, computed, restore):
                break
            self.waiting.popleft()
            if swapped:
                self.kv.swap_in(req)
            elif self.kv.enable_prefix_caching:
                self.kv.record_lookup(req.num_tokens, num_cached)
            req.num_computed_tokens = num_cached
            self.kv.cache_blocks(req, num_cached + n)
            if req.metrics.first_scheduled_time is None:
                req.metrics.num_cached_tokens = num_cached
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.requests.append(req)
            out.num_tokens.append(n)
            budget -= n
        out.block_copies = self.kv.take_pending_copies()
        return out

    def _preempt(self, req: Request) -> None:
        if not self.kv.swap_out(req):  # swapped out, it keeps its computed tokens
            req.num_computed_tokens = 0
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def update_computed(self, out: SchedulerOutput) -> None:
        """After the forward: the scheduled tokens now have K/V."""
        for req, n in zip(out.requests, out.num_tokens):
            req.num_computed_tokens += n

    def add_running(self, req: Request) -> None:
        """A forked child joins the batch right behind its parent (it already holds blocks)."""
        self.running.append(req)

    def finish(self, req: Request, status: RequestStatus) -> None:
        """Retire a request (stopped, length or aborted): it leaves its queue and frees its blocks."""
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        elif not req.status.finished:
            self.waiting.remove(req)
        req.status = status
        self.kv.free(req)
        if self.kv.offload is not None:
            self.kv.offload.discard(req.request_id)
