"""Packed fixed-length sequences from token shards, with a position that checkpoints exactly.

    loader = PackedLoader(train_sets, weights, seq_len=512, micro_batch=8, rank=0, world=1, seed=0)
    batch = loader.next_batch()              # LongTensor (micro_batch, seq_len + 1)
    state = loader.state_dict()              # {"sequences": 1234, "picks": [864, 370]}
    loader.load_state_dict(state)            # continue exactly where it was

Packing: the shards already hold documents separated by EOS, so a sequence is simply a window
of seq_len + 1 consecutive tokens (inputs = window[:-1], targets = window[1:]); windows of one
shard start every seq_len tokens and never cross shards. Each component's windows are visited
in a seeded random order per epoch (the permutation is a pure function of seed, component and
epoch), so the position is a few integers.

Distributed: all ranks walk the same global sequence stream and rank r takes its slice of each
group of world * micro_batch sequences. With gradient accumulation, one process doing A micro
steps sees exactly the sequences that A processes see in one step, in the same order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from ember.data.mixture import MixtureSchedule
from ember.data.shards import TokenShards
from ember.data.sources import DataSourceError


class Windows:
    """The seq_len + 1 token windows of one split of one component."""

    def __init__(self, shards: TokenShards, seq_len: int) -> None:
        self.seq_len = seq_len
        self.arrays = shards.shards
        counts = [max(0, (len(a) - 1) // seq_len) for a in self.arrays]
        self.offsets = np.cumsum([0] + counts)
        self.folder = shards.folder

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def get(self, i: int) -> np.ndarray:
        s = int(np.searchsorted(self.offsets, i, side="right")) - 1
        start = (i - int(self.offsets[s])) * self.seq_len
        return self.arrays[s][start:start + self.seq_len + 1]


def _permutation(n: int, seed: int, component: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + component * 10_007 + epoch)
    return torch.randperm(n, generator=g)


class PackedLoader:
    """This rank's micro-batches of packed training sequences (see the module docstring)."""

    def __init__(self, train: Sequence[TokenShards], weights: Sequence[float], *, seq_len: int,
                 micro_batch: int, rank: int = 0, world: int = 1, seed: int = 0) -> None:
        self.windows = [Windows(t, seq_len) for t in train]
        for w in self.windows:
            if len(w) == 0:
                raise DataSourceError(f"{w.folder} has fewer than seq_len + 1 = {seq_len + 1} training "
                                      "tokens; add text or lower --seq-len")
        self.schedule = MixtureSchedule(weights)
        self.micro_batch, self.rank, self.world, self.seed = micro_batch, rank, world, seed
        self.sequences = 0  # global sequences consumed, all ranks together
        self._perm: dict[int, tuple[int, torch.Tensor]] = {}

    def _perm_for(self, component: int, epoch: int) -> torch.Tensor:
        """The window order of one component's epoch (cached: epochs advance one at a time)."""
        cached = self._perm.get(component)
        if cached is None or cached[0] != epoch:
            cached = (epoch, _permutation(len(self.windows[component]), self.seed, component, epoch))
            self._perm[component] = cached
        return cached[1]

    def _window(self, component: int, pick: int) -> np.ndarray:
        w = self.windows[component]
        epoch, idx = divmod(pick, len(w))
        return w.get(int(self._perm_for(component, epoch)[idx]))

    def next_batch(self) -> torch.Tensor:
        """The next (micro_batch, seq_len + 1) token block for this rank."""
        rows = []
        for j in range(self.world * self.micro_batch):
            c = self.schedule.next()
            pick = self.schedule.picks[c] - 1
            if j // self.micro_batch == self.rank:
                rows.append(torch.from_numpy(self._window(c, pick).astype(np.int64)))
        self.sequences += self.world * self.micro_batch
        return torch.stack(rows)

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"sequences": self.sequences, **self.schedule.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.schedule.load_state_dict(state)
        self.sequences = int(state["sequences"])


def validation_windows(val: Sequence[TokenShards], seq_len: int, max_sequences: int) -> list[list[np.ndarray]]:
    """Fixed validation sequences per component: the first windows in order, at most max_sequences each.

    A split shorter than one window still gives one (shorter) sequence, so every component with
    held-out text is measured.
    """
    out = []
    for shards in val:
        w = Windows(shards, seq_len)
        seqs = [w.get(i) for i in range(min(len(w), max_sequences))]
        if not seqs:
            seqs = [a for a in shards.shards if len(a) >= 2][:1]
        out.append(seqs)
    return out
