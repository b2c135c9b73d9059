"""KVCacheManager: who owns which KV block, and automatic prefix caching.

The K/V tensors themselves live in one preallocated pool (ember/engine/attn_metadata.py); this
class only does the bookkeeping, so it is cheap to property-test. Each request has a block
table (block ids in position order, `block_size` tokens each). Blocks carry reference counts:
n > 1 forks and prefix-cache hits share a block between requests.

Prefix caching: every full block is hashed together with its parent block's hash,
    h_i = blake2b(h_{i-1} || tokens of block i)
so a hash names the whole prefix up to that block. When a request is admitted, its leading
full blocks are looked up; hits are shared instead of recomputed. Freed blocks keep their
hash and stay reusable until the allocator needs them: the free queue is in LRU order,
blocks without a hash (useless to anyone) go to its front and are taken first, and a request's
blocks are freed tail first so that shared prefixes outlive their suffixes.

Copy-on-write: a forked request shares its parent's partially filled last block; the first
write into a shared partial block allocates a private one and queues a (src, dst) copy that
the model runner performs before the next forward.

Offload (ember/engine/kv_offload.py, when `offload` is set): a hashed block the allocator evicts
is spilled to the tier first, `offloaded_prefix` finds the blocks a prompt can restore from it
after the pool's hits end, and `swap_out` / `swap_in` move a preempted request's whole table.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ember.engine.request import Request

if TYPE_CHECKING:
    from ember.engine.kv_offload import KVOffloadTier


def hash_block(parent: bytes, tokens: list[int]) -> bytes:
    """Hash of a full block given its parent's hash (b"" for the first block)."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


class KVCacheManager:
    """Block pool bookkeeping: allocation, sharing, prefix-cache lookups, LRU eviction."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_cnt = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # front = evicted first
        self.cached: dict[bytes, int] = {}  # block hash -> block id
        self.tables: dict[str, list[int]] = {}
        self.num_hashed: dict[str, int] = {}  # leading blocks of a request already registered in `cached`
        self.pending_copies: list[tuple[int, int]] = []
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens found
        self.offload: KVOffloadTier | None = None  # set by the engine when kv_offload_gb > 0

    # ---- queries ------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (cached free blocks count as free)."""
        return 1.0 - len(self.free_queue) / self.num_blocks

    def block_table(self, request_id: str) -> list[int]:
        return self.tables.get(request_id, [])

    def update_hashes(self, req: Request) -> None:
        """Extend req.block_hashes to every full block of its tokens."""
        bs, hashes, tokens = self.block_size, req.block_hashes, req.token_ids
        while (len(hashes) + 1) * bs <= len(tokens):
            i = len(hashes)
            hashes.append(hash_block(hashes[-1] if hashes else b"", tokens[i * bs:(i + 1) * bs]))

    def get_computed_blocks(self, req: Request) -> list[int]:
        """Cached blocks holding the longest known prefix of req (at least one token stays to compute)."""
        if not self.enable_prefix_caching or req.prompt_logprobs is not None:
            return []  # prompt logprobs need every prompt position computed
        self.update_hashes(req)
        hits: list[int] = []
        for h in req.block_hashes[:(req.num_tokens - 1) // self.block_size]:
            block = self.cached.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def offloaded_prefix(self, req: Request, num_pool_hits: int) -> list[bytes]:
        """Hashes of the blocks after req's pool hits that the offload tier can restore, in order."""
        if self.offload is None or not self.enable_prefix_caching or req.prompt_logprobs is not None:
            return []
        found: list[bytes] = []
        for h in req.block_hashes[num_pool_hits:(req.num_tokens - 1) // self.block_size]:
            if h not in self.offload or h in self.cached:
                break
            found.append(h)
        return found

    def record_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_queries += num_tokens
        self.prefix_hits += num_hit_tokens

    # ---- allocation ---------------------------------------------------------------------------
    def allocate_slots(self, req: Request, num_new_tokens: int, computed_blocks: list[int] = (),
                       restore: Sequence[bytes] = ()) -> bool:
        """Make req's table cover its computed tokens + computed_blocks + restore + num_new_tokens.

        computed_blocks (prefix-cache hits, only for a request without a table) are shared;
        restore (hashes from `offloaded_prefix`) get new blocks filled from the offload tier.
        Returns False, changing nothing, when the pool has too few free blocks.
        """
        table = self.tables.get(req.request_id, [])
        bs = self.block_size
        total = req.num_computed_tokens + (len(computed_blocks) + len(restore)) * bs + num_new_tokens
        new = -(-total // bs) - len(table) - len(computed_blocks)
        # The first block written this step must be private (a fork may share it).
        write_idx = req.num_computed_tokens // bs
        cow = write_idx < len(table) and self.ref_cnt[table[write_idx]] > 1
        reused_free = sum(1 for b in computed_blocks if self.ref_cnt[b] == 0)
        if max(new, 0) + cow > len(self.free_queue) - reused_free:
            return False
        for b in computed_blocks:
            if self.ref_cnt[b] == 0:
                del self.free_queue[b]
            self.ref_cnt[b] += 1
        table = self.tables.setdefault(req.request_id, table)
        table.extend(computed_blocks)
        if cow:
            src = table[write_idx]
            self.ref_cnt[src] -= 1
            table[write_idx] = self._take()
            self.pending_copies.append((src, table[write_idx]))
        slots = self.offload.pin(restore) if restore else []  # taking blocks below may spill into the tier
        for _ in range(new):
            table.append(self._take())
        if restore:
            blocks = table[len(table) - new:len(table) - new + len(restore)]
            self.offload.restore(restore, slots, blocks)
            for b, h in zip(blocks, restore):
                self.block_hash[b] = h
                self.cached[h] = b
        return True

    def _take(self) -> int:
        block, _ = self.free_queue.popitem(last=False)
        h = self.block_hash[block]
        if h is not None:  # evict: the cached prefix ending here leaves the pool
            if self.cached.get(h) == block:
                del self.cached[h]
                if self.offload is not None:
                    self.offload.spill(block, h)
            self.block_hash[block] = None
        self.ref_cnt[block] = 1
        return block

    def cache_blocks(self, req: Request, num_tokens: int) -> None:
        """Register the blocks that req's first num_tokens tokens fill in the prefix cache.

        Called when a step is scheduled, for the tokens it will compute: a request scheduled
        later in the same step may already share them, because every layer writes the step's
        K/V before any attention reads it (attn_metadata.py).
        """
        if not self.enable_prefix_caching:
            return
        table = self.tables.get(req.request_id)
        if table is None:
            return
        full = min(num_tokens // self.block_size, len(table))
        start = self.num_hashed.get(req.request_id, 0)
        if full <= start:
            return
        self.update_hashes(req)
        for i in range(start, full):
            block, h = table[i], req.block_hashes[i]
            if self.block_hash[block] is None and h not in self.cached:
                self.block_hash[block] = h
                self.cached[h] = block
        self.num_hashed[req.request_id] = full

    def fork(self, parent: Request, child: Request) -> None:
        """child shares every block of parent (its partial last block is copied on first write)."""
        table = list(self.tables.get(parent.request_id, []))
        for b in table:
            self.ref_cnt[b] += 1
        self.tables[child.request_id] = table
        self.num_hashed[child.request_id] = self.num_hashed.get(parent.request_id, 0)

    def free(self, req: Request) -> None:
        """Drop req's references; blocks nobody holds become free (cached ones stay findable)."""
        table = self.tables.pop(req.request_id, None)
        self.num_hashed.pop(req.request_id, None)
        if not table:
            return
        for b in reversed(table):  # tail first: it is evicted before the shared prefix
            self.ref_cnt[b] -= 1
            if self.ref_cnt[b] == 0:
                self.free_queue[b] = None
                if self.block_hash[b] is None:
                    self.free_queue.move_to_end(b, last=False)

    def swap_out(self, req: Request) -> bool:
        """Copy req's blocks to the offload tier (before `free`); False when there is no tier or room."""
        table = self.tables.get(req.request_id)
        return bool(table) and self.offload is not None and self.offload.swap_out(req.request_id, table)

    def swap_in(self, req: Request) -> None:
        """Fill the table just allocated for a swapped request from the tier."""
        self.offload.swap_in(req.request_id, self.tables[req.request_id])

    def take_pending_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    # ---- checking -----------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Assert the bookkeeping is consistent (tests and debugging)."""
        counts = [0] * self.num_blocks
        for table in self.tables.values():
            assert len(set(table)) == len(table), "a block appears twice in one table"
            for b in table:
                counts[b] += 1
        assert counts == self.ref_cnt, "reference counts differ from the block tables"
        assert set(self.free_queue) == {b for b in range(self.num_blocks) if counts[b] == 0}, \
            "the free queue is not exactly the unreferenced blocks"
        for h, b in self.cached.items():
            assert self.block_hash[b] == h, "a cached hash points to a block with another hash"
        assert len(self.cached) == sum(h is not None for h in self.block_hash), "hashed blocks not in the cache map"
        if self.offload is not None:
            self.offload.check_invariants()
