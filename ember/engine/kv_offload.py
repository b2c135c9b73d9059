"""KVOffloadTier: a second, larger tier behind the paged KV pool (host memory or an mmap'd file).

The pool (ember/engine/attn_metadata.py) is what attention reads; this tier only stores whole
blocks copied out of it, in `slots`:

    store (num_slots, layers, 2, Hkv, block_size, D)     one contiguous slot per block

Two kinds of content share the slots:
  * prefix blocks, named by their prefix hash (kv_cache.py): a hashed block the pool's allocator
    evicts is copied here first (spill), and a later prompt whose prefix misses the pool but hits
    here gets it copied back (restore) instead of recomputing it. These slots are an LRU: a full
    tier drops its least recently used prefix block to make room.
  * swapped sequences: a preempted request's whole block table is copied here (swap out) and
    back when it is scheduled again (swap in), so it keeps its computed tokens instead of
    recomputing prompt and output. These slots are pinned until swapped in or the request ends;
    a swap that would not fit even after dropping every prefix block is refused, and the
    scheduler recomputes as it does without a tier.

Copies happen when the bookkeeping decides them (the engine is synchronous: the pool's old
contents are still intact while a step is being scheduled, and the forward that overwrites a
block runs after). Restored blocks are marked initialized in the runner's map, so it does not
zero them.

Where the slots live: on a CPU, an mmap'd file (torch.from_file) in `directory`, or in a fresh
temporary directory by default; the file is reserved in full (posix_fallocate, so a full disk is
an error now, not a SIGBUS later) and unlinked as soon as it is mapped, so nothing is left behind
even when the process is killed. With a CUDA pool and no directory, pinned host memory.
"""

from __future__ import annotations

import os
import tempfile
from collections import OrderedDict
from collections.abc import Sequence

import torch

from ember.errors import EmberError

GiB = 1024 ** 3


class KVOffloadError(EmberError):
    """The offload tier cannot be created (directory missing or read-only, disk full, too small)."""


def _mapped_file(directory: str | os.PathLike | None, nbytes: int) -> torch.Tensor:
    """nbytes of uint8 backed by a reserved, already unlinked file in `directory` (a temp dir if None)."""
    own_dir = directory is None
    if own_dir:
        directory = tempfile.mkdtemp(prefix="ember-kv-offload-")
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise KVOffloadError(f"kv_offload_dir {directory!r} is not a directory: create it or pick another")
    try:
        fd, path = tempfile.mkstemp(prefix="ember-kv-offload-", suffix=".bin", dir=directory)
    except OSError as e:
        raise KVOffloadError(f"cannot create the KV offload file in {directory!r} ({e.strerror}): "
                             "give a writable --kv-offload-dir") from None
    try:
        try:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, nbytes)
            else:  # macOS: a sparse file, its blocks found when first written
                os.ftruncate(fd, nbytes)
        except OSError as e:
            raise KVOffloadError(f"cannot reserve {nbytes / GiB:.2f} GiB for the KV offload file in {directory!r} "
                                 f"({e.strerror}): free space there or lower --kv-offload-gb") from None
        return torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
    finally:
        os.close(fd)
        os.unlink(path)  # the mapping keeps the space until the process lets go of it
        if own_dir:
            os.rmdir(directory)


class KVOffloadTier:
    """Slots holding copies of pool blocks: an LRU of prefix blocks and pinned swapped sequences."""

    def __init__(self, pool: torch.Tensor, initialized: bytearray, num_slots: int,
                 directory: str | os.PathLike | None = None) -> None:
        if num_slots < 1:
            raise KVOffloadError("the KV offload tier is smaller than one KV block: raise kv_offload_gb")
        self.pool = pool  # (layers, 2, num_blocks, Hkv, block_size, D)
        self.initialized = initialized
        shape = (num_slots,) + tuple(pool.shape[:2]) + tuple(pool.shape[3:])
        if pool.device.type == "cuda" and directory is None:
            self.store = torch.empty(shape, dtype=pool.dtype, pin_memory=True)
            self.where = "pinned host memory"
        else:
            nbytes = num_slots * pool[:, :, 0].numel() * pool.element_size()
            self.store = _mapped_file(directory, nbytes).view(pool.dtype).view(shape)
            self.where = f"an mmap'd file in {directory or tempfile.gettempdir()}"
        self.num_slots = num_slots
        self.free_slots = list(range(num_slots - 1, -1, -1))  # popped from the end: slot 0 first
        self.prefix: OrderedDict[bytes, int] = OrderedDict()  # hash -> slot; front = dropped first
        self.swapped: dict[str, list[int]] = {}  # request id -> slots of its table, in order
        self.stored_prefix_blocks = 0  # pool -> tier copies, by kind
        self.stored_swap_blocks = 0
        self.restored_prefix_blocks = 0  # tier -> pool copies, by kind
        self.restored_swap_blocks = 0
        self.dropped_blocks = 0  # prefix blocks dropped from a full tier
        self.swapped_sequences = 0  # preemptions served by a swap instead of a recompute

    @classmethod
    def sized(cls, pool: torch.Tensor, initialized: bytearray, gib: float,
              directory: str | os.PathLike | None = None) -> KVOffloadTier:
        """A tier of `gib` GiB (whole blocks) behind `pool`."""
        block_bytes = pool[:, :, 0].numel() * pool.element_size()
        return cls(pool, initialized, int(gib * GiB // block_bytes), directory)

    # ---- queries ------------------------------------------------------------------------------
    @property
    def usage(self) -> float:
        """Fraction of slots holding a block."""
        return 1.0 - len(self.free_slots) / self.num_slots

    def __contains__(self, block_hash: bytes) -> bool:
        return block_hash in self.prefix

    def is_swapped(self, request_id: str) -> bool:
        return request_id in self.swapped

    # ---- prefix blocks ------------------------------------------------------------------------
    def spill(self, block: int, block_hash: bytes) -> None:
        """The pool evicts hashed `block`: keep a copy (unless one is here already or nothing fits)."""
        if block_hash in self.prefix:
            self.prefix.move_to_end(block_hash)
            return
        slot = self._slot()
        if slot is None:
            return  # every slot holds a swapped sequence: the prefix is recomputed if it returns
        self.store[slot].copy_(self.pool[:, :, block])
        self.prefix[block_hash] = slot
        self.stored_prefix_blocks += 1

    def pin(self, hashes: Sequence[bytes]) -> list[int]:
        """Take these prefix blocks out of the LRU so spills cannot overwrite them before `restore`."""
        return [self.prefix.pop(h) for h in hashes]

    def restore(self, hashes: Sequence[bytes], slots: Sequence[int], blocks: Sequence[int]) -> None:
        """Copy pinned slots into pool blocks; the entries go back as the most recently used."""
        for h, slot, block in zip(hashes, slots, blocks, strict=True):
            self.pool[:, :, block].copy_(self.store[slot])
            self.initialized[block] = 1
            self.prefix[h] = slot
        self.restored_prefix_blocks += len(blocks)

    # ---- swapped sequences --------------------------------------------------------------------
    def swap_out(self, request_id: str, blocks: Sequence[int]) -> bool:
        """Copy a preempted request's blocks here; False (nothing changed) when they cannot fit."""
        if len(blocks) > len(self.free_slots) + len(self.prefix):
            return False
        slots = [self._slot() for _ in blocks]
        for slot, block in zip(slots, blocks):
            self.store[slot].copy_(self.pool[:, :, block])
        self.swapped[request_id] = slots
        self.stored_swap_blocks += len(blocks)
        self.swapped_sequences += 1
        return True

    def swap_in(self, request_id: str, blocks: Sequence[int]) -> None:
        """Copy a swapped request's blocks into the first of `blocks` and free its slots."""
        slots = self.swapped.pop(request_id)
        for slot, block in zip(slots, blocks):
            self.pool[:, :, block].copy_(self.store[slot])
            self.initialized[block] = 1
        self.free_slots.extend(slots)
        self.restored_swap_blocks += len(slots)

    def discard(self, request_id: str) -> None:
        """A swapped request ended (aborted) before it came back: free its slots."""
        self.free_slots.extend(self.swapped.pop(request_id, ()))

    # ---- internals ----------------------------------------------------------------------------
    def _slot(self) -> int | None:
        if self.free_slots:
            return self.free_slots.pop()
        if self.prefix:
            _, slot = self.prefix.popitem(last=False)
            self.dropped_blocks += 1
            return slot
        return None

    def check_invariants(self) -> None:
        """Assert every slot is exactly one of free, a prefix block, or part of a swapped sequence."""
        held = list(self.free_slots) + list(self.prefix.values()) + [s for v in self.swapped.values() for s in v]
        assert sorted(held) == list(range(self.num_slots)), "offload slots lost or held twice"
