"""Paged attention for the engine: K/V written to and read from fixed-size blocks of one pool.

The pool is one preallocated tensor for all layers,
    kv_cache (layers, 2, num_blocks, Hkv, block_size, D)       2 = keys, values
and a step's batch is flattened to N tokens, so the model sees q (1, N, H, D), k/v (1, N, Hkv, D).
`AttnMetadata` implements the model's AttentionBackend protocol (ember/model/attention.py):

    attend(q, k, v, spec):
      1. write this step's k/v into the pool at each token's slot (block, offset)
      2. decode queries (one new token per sequence): with the native CPU kernel
         (ember/engine/kernels/paged_attention.c, on CPU, no ALiBi) one call for all of
         them, each reading its own blocks straight from the pool; otherwise batched SDPAs over
         the sequences' blocks gathered into a padded workspace, keys past each sequence's
         length masked; sequences go in groups of similar length small enough for the
         workspace to stay in cache; GQA without copies by viewing the rep query heads of a
         KV head as its queries
      3. prefill chunks attend one sequence at a time: a fresh prompt uses its own k/v, a chunk
         after cached tokens gathers its blocks; on CPU in fp32 (no ALiBi) the native causal
         kernel (ember/engine/kernels/prefill_attention.c) attends, otherwise SDPA, causal or
         with a positional mask

The pool's dtype is the engine's kv_cache_dtype: the model's own, or a 16-bit one that halves
the cache's memory and the bytes decode attention reads. Attention always computes in the
model's dtype over the values as stored (a fresh prompt's own k/v are rounded to the pool's
dtype first, so cached and recomputed prefixes agree).

The gather reuses one growing workspace instead of fresh tensors: on CPU, touching newly
mapped pages every layer costs more than the attention itself. Masks follow `position_bias`:
sliding windows and ALiBi work in both paths. All index tensors are built once per step and
shared by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ember.config import ModelConfig
from ember.engine import native
from ember.model.attention import AttnSpec, position_bias, sdpa


def allocate_kv_cache(cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                      device: torch.device | str) -> torch.Tensor:
    """The block pool: (layers, 2, num_blocks, Hkv, block_size, D), uninitialized.

    Pages are touched only when blocks are first used (the runner zeroes a block then), so
    a large budget costs no memory until requests need it.
    """
    shape = (cfg.num_layers, 2, num_blocks, cfg.n_kv_heads, block_size, cfg.d_head)
    return torch.empty(shape, dtype=dtype, device=device)


class Workspace:
    """Reusable buffers (gathered K/V; the prefill kernel's scratch), each grown on demand (see
    the module docstring)."""

    def __init__(self) -> None:
        self.bufs: dict[str, torch.Tensor] = {}

    def get(self, numel: int, like: torch.Tensor, name: str = "kv") -> torch.Tensor:
        buf = self.bufs.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
            buf = self.bufs[name] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buf[:numel]


@dataclass
class PrefillSeq:
    """One sequence computing more than one token: flat rows [start, end), positions from pos0."""

    start: int
    end: int
    pos0: int  # tokens already in the cache before this chunk
    gather_rows: torch.Tensor | None  # (Hkv * nblocks,) pool rows of its blocks, None if pos0 == 0


@dataclass
class DecodeBatch:
    """Decode queries attending together: one padded key gather and one weighted value sum per layer."""

    rows: torch.Tensor  # (Bd,) flat index of each query
    pos: torch.Tensor  # (Bd,) position of each query
    gather_rows: torch.Tensor  # (Bd * Hkv * nblocks,) pool rows of keys, sequences padded to nblocks
    value_rows: torch.Tensor  # (Bd, Hkv, S) token rows of the values, (blocks * Hkv * bs, D) view
    nblocks: int
    bias: dict = field(default_factory=dict)  # masks per (window, alibi, heads), built once per step
    bags: dict = field(default_factory=dict)  # embedding_bag inputs per heads-per-KV-head


@dataclass
class NativeDecode:
    """Every decode query of the step, for the native kernel (ember/engine/kernels/paged_attention.c)."""

    rows: torch.Tensor  # (Bd,) flat index of each query
    tables: torch.Tensor  # (Bd, W) int64 block tables padded to the longest
    lens: torch.Tensor  # (Bd,) int64 keys per query (its position + 1)
    in_order: bool  # rows are exactly 0..N-1: the step is decodes only
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)  # fp32 scratch shared by the step's layers
    layer_call: native.DecodeLayerCall | None = None  # the step's one-call layers (ember/engine/fused_layer.py)

    def buffer(self, name: str, numel: int) -> torch.Tensor:
        """The step's fp32 buffer `name` of at least `numel` values, reused by every layer."""
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < numel:
            buf = self.buffers[name] = torch.empty(numel, dtype=torch.float32)
        return buf

    def scratch(self, num_heads: int, block_size: int) -> torch.Tensor:
        """The paged decode kernel's score buffer for this step."""
        return self.buffer("scratch", native.scratch_size(num_heads, self.tables, block_size))


def split_by_length(nblocks: list[int], block_bytes: int, budget: int = 8 * 2**20) -> list[list[int]]:
    """Indices in groups of similar length whose gathered K/V stay within `budget` bytes.

    Longest first; a group grows while (members + 1) * its longest * block_bytes fits, so its
    workspace stays in cache between the gather and the attention that reads it, and padding
    to the group's longest is small.
    """
    order = sorted(range(len(nblocks)), key=lambda i: -nblocks[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * nblocks[groups[-1][0]] * block_bytes <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return [sorted(g) for g in groups]  # batch order inside a group


@dataclass
class AttnMetadata:
    """Everything attention needs about one flattened step; implements AttentionBackend."""

    kv_cache: torch.Tensor
    block_size: int
    slot_block: torch.Tensor  # (N,) block of each token
    slot_rows: torch.Tensor  # (N * Hkv,) row of each token's K (or V) per KV head in a (-1, D) view of the pool
    prefills: list[PrefillSeq]
    dec_rows: list[int]  # decode queries: flat row, position, blocks up to that position
    dec_pos: list[int]
    dec_tables: list[list[int]]
    native: NativeDecode | None
    workspace: Workspace = field(default_factory=Workspace)
    _decodes: list[DecodeBatch] | None = None

    @classmethod
    def build(cls, kv_cache: torch.Tensor, block_size: int, seqs: list[tuple[list[int], int, int]],
              workspace: Workspace) -> "AttnMetadata":
        """seqs: (block_table, tokens already cached, tokens computed now) per sequence, batch order."""
        dev = kv_cache.device
        hkv = kv_cache.shape[3]
        blocks, offsets, prefills = [], [], []
        dec_rows, dec_pos, dec_tables = [], [], []
        row = 0
        for table, pos0, n in seqs:
            for p in range(pos0, pos0 + n):
                blocks.append(table[p // block_size])
                offsets.append(p % block_size)
            if n == 1:
                dec_rows.append(row)
                dec_pos.append(pos0)
                dec_tables.append(table[:pos0 // block_size + 1])
            else:
                gather = None
                if pos0 > 0:
                    gather = _gather_rows(torch.tensor([table[:(pos0 + n - 1) // block_size + 1]]), hkv)
                    gather = gather.to(dev)
                prefills.append(PrefillSeq(row, row + n, pos0, gather))
            row += n
        nat = None
        if dec_rows and native.supports(kv_cache):
            width = max(len(t) for t in dec_tables)
            tables = torch.tensor([t + [t[-1]] * (width - len(t)) for t in dec_tables], dtype=torch.int64)
            nat = NativeDecode(torch.tensor(dec_rows), tables, torch.tensor(dec_pos, dtype=torch.int64) + 1,
                               len(dec_rows) == row)
        slot_block = torch.tensor(blocks)
        slot_rows = ((slot_block[:, None] * hkv + torch.arange(hkv)) * block_size
                     + torch.tensor(offsets)[:, None]).reshape(-1)
        return cls(kv_cache, block_size, slot_block.to(dev), slot_rows.to(dev), prefills, dec_rows, dec_pos,
                   dec_tables, nat, workspace)

    @property
    def decodes(self) -> list[DecodeBatch]:
        """The decode queries in length groups for the PyTorch path, built on first use."""
        if self._decodes is None:
            self._decodes = self._decode_batches()
        return self._decodes

    def _decode_batches(self) -> list[DecodeBatch]:
        kv_cache, block_size, dec_tables = self.kv_cache, self.block_size, self.dec_tables
        dev, hkv = kv_cache.device, kv_cache.shape[3]
        decodes = []
        block_bytes = 2 * kv_cache[0, 0, 0].numel() * kv_cache.element_size()  # K + V of one block, one layer
        for group in split_by_length([len(t) for t in dec_tables], block_bytes):
            width = max(len(dec_tables[i]) for i in group)
            padded = torch.tensor([dec_tables[i] + [dec_tables[i][-1]] * (width - len(dec_tables[i]))
                                   for i in group])  # (Bd, width)
            heads, offs = torch.arange(hkv)[None, :, None, None], torch.arange(block_size)[None, None, None, :]
            value_rows = ((padded[:, None, :, None] * hkv + heads) * block_size + offs).flatten(2)  # (Bd, Hkv, S)
            decodes.append(DecodeBatch(torch.tensor([self.dec_rows[i] for i in group], device=dev),
                                       torch.tensor([self.dec_pos[i] for i in group], device=dev),
                                       _gather_rows(padded, hkv).to(dev), value_rows.to(dev), width))
        return decodes

    # ---- the AttentionBackend protocol ----------------------------------------------------------
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttnSpec) -> torch.Tensor:
        kc, vc = self.kv_cache[spec.layer_idx]  # (num_blocks, Hkv, bs, D) each
        native.kv_write(kc, k[0], self.slot_rows)
        native.kv_write(vc, v[0], self.slot_rows)
        nat = self.native if not spec.alibi else None  # the kernel has no ALiBi
        if nat is not None and nat.in_order:
            return native.paged_decode(q[0], kc, vc, nat.tables, nat.lens, spec.num_kv_heads, spec.scale,
                                       spec.sliding_window, nat.scratch(spec.num_heads, self.block_size)).unsqueeze(0)
        if nat is None and len(self.decodes) == 1 and not self.prefills \
                and self.decodes[0].rows.numel() == q.shape[1]:
            return self._decode(q[0], kc, vc, spec, self.decodes[0]).unsqueeze(0)  # rows are 0..N-1
        out = torch.empty_like(q[0])  # (N, H, D)
        if nat is not None:
            out[nat.rows] = native.paged_decode(q[0, nat.rows], kc, vc, nat.tables, nat.lens, spec.num_kv_heads,
                                                spec.scale, spec.sliding_window,
                                                nat.scratch(spec.num_heads, self.block_size))
        else:
            for d in self.decodes:
                out[d.rows] = self._decode(q[0, d.rows], kc, vc, spec, d)
        for p in self.prefills:
            self._prefill(q[:, p.start:p.end], k[:, p.start:p.end], v[:, p.start:p.end], p, kc, vc, spec,
                          out[p.start:p.end])
        return out.unsqueeze(0)

    # ---- decode: one batched SDPA ---------------------------------------------------------------
    def _decode(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, spec: AttnSpec,
                d: DecodeBatch) -> torch.Tensor:
        """q (Bd, H, D) -> (Bd, H, D), each query attending over its own blocks.

        Keys are gathered (the scores need them side by side); values are never copied: an
        embedding_bag sums the pool's value rows weighted by the attention probabilities.
        """
        Bd, hkv, D = q.shape[0], spec.num_kv_heads, spec.head_dim
        S = d.nblocks * self.block_size
        # A kv_cache_dtype other than the model's: values are gathered too, widened, then a matmul.
        widen = vc.dtype != q.dtype
        keys, *values = self._gather([kc, vc] if widen else [kc], d.gather_rows, (Bd, hkv, S, D))
        rep = spec.num_heads // hkv
        qg = q.view(Bd, hkv, rep, D)  # the rep query heads sharing a KV head act as its queries
        scores = torch.matmul(qg, keys.to(q.dtype).transpose(-1, -2)).float().mul_(spec.scale)  # (Bd, Hkv, rep, S)
        bias = self._decode_bias(spec, S, d)
        if bias is not None:
            scores += bias
        if widen:
            probs = torch.softmax(scores, dim=-1).to(q.dtype)
            return torch.matmul(probs, values[0].to(q.dtype)).view(Bd, spec.num_heads, D)
        probs = torch.softmax(scores, dim=-1).to(vc.dtype)
        if rep not in d.bags:
            rows = d.value_rows[:, :, None, :].expand(Bd, hkv, rep, S).reshape(-1)
            d.bags[rep] = rows, torch.arange(0, rows.numel(), S, device=rows.device)
        rows, offsets = d.bags[rep]
        y = torch.nn.functional.embedding_bag(rows, vc.view(-1, D), offsets, mode="sum",
                                              per_sample_weights=probs.reshape(-1))
        return y.view(Bd, spec.num_heads, D)

    def _decode_bias(self, spec: AttnSpec, S: int, d: DecodeBatch) -> torch.Tensor | None:
        key = (spec.sliding_window, spec.alibi, spec.num_heads, spec.num_kv_heads)
        if key not in d.bias:
            pos = d.pos
            dist = pos[:, None] - torch.arange(S, device=pos.device)[None, :]  # (Bd, S)
            visible = dist >= 0
            if spec.sliding_window is not None:
                visible &= dist < spec.sliding_window
            bias = None
            if not bool(visible.all()) or spec.alibi:
                bias = torch.zeros(dist.shape, dtype=torch.float32, device=pos.device)
                bias.masked_fill_(~visible, float("-inf"))
                bias = bias[:, None, None, :]  # (Bd, 1, 1, S)
                if spec.alibi:
                    slopes = spec.alibi_slopes(pos.device).to(bias.dtype)
                    slopes = slopes.view(1, spec.num_kv_heads, -1, 1)  # (1, Hkv, rep, 1)
                    bias = bias - slopes * dist[:, None, None, :].to(bias.dtype)
            d.bias[key] = bias
        return d.bias[key]

    # ---- prefill: per sequence -------------------------------------------------------------------
    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: PrefillSeq,
                 kc: torch.Tensor, vc: torch.Tensor, spec: AttnSpec, out: torch.Tensor) -> None:
        """out (T, H, D) = the chunk's attention: q, k, v (1, T, heads, D)."""
        T = p.end - p.start
        if p.gather_rows is None:  # the chunk holds every key it needs
            if kc.dtype != k.dtype:
                # Attend over the keys and values as the pool holds them, as every later read will:
                # a prompt then gives the same results whether its prefix was cached or computed.
                k, v = k.to(kc.dtype).to(k.dtype), v.to(vc.dtype).to(v.dtype)
            keys, values, k_len = k, v, T
        else:
            k_len = p.pos0 + T
            nb = p.gather_rows.numel() // spec.num_kv_heads
            shape = (1, spec.num_kv_heads, nb * self.block_size, spec.head_dim)
            keys, values = self._gather([kc, vc], p.gather_rows, shape)
            keys, values = keys[:, :, :k_len].transpose(1, 2), values[:, :, :k_len].transpose(1, 2)
            keys, values = keys.to(q.dtype), values.to(q.dtype)
        if not spec.alibi:
            y = native.prefill_attention(q[0], keys[0], values[0], p.pos0, spec.scale, spec.sliding_window,
                                         lambda n: self.workspace.get(n, q, "prefill"), out)
            if y is not None:
                return
        if p.gather_rows is None and spec.sliding_window is None and not spec.alibi:
            out.copy_(sdpa(q, keys, values, spec, None, is_causal=True)[0])
            return
        q_pos = torch.arange(p.pos0, p.pos0 + T, device=q.device)[None]
        k_pos = torch.arange(k_len, device=q.device)[None]
        out.copy_(sdpa(q, keys, values, spec, position_bias(spec, q_pos, k_pos, q.dtype), is_causal=False)[0])

    def _gather(self, pools: list[torch.Tensor], rows: torch.Tensor,
                shape: tuple[int, int, int, int]) -> list[torch.Tensor]:
        """Copy the listed rows of each pool (num_blocks, Hkv, bs, D) into the workspace, viewed as shape."""
        bs, D = self.block_size, pools[0].shape[-1]
        n = rows.numel() * bs * D
        ws = self.workspace.get(len(pools) * n, pools[0])
        return [torch.index_select(pool.view(-1, bs, D), 0, rows, out=ws[i * n:(i + 1) * n].view(-1, bs, D)).view(shape)
                for i, pool in enumerate(pools)]


def _gather_rows(tables: torch.Tensor, hkv: int) -> torch.Tensor:
    """Pool rows (block * Hkv + head) in (seq, head, block) order: the gather is then contiguous."""
    heads = torch.arange(hkv)
    return (tables[:, None, :] * hkv + heads[None, :, None]).reshape(-1)  # (B * Hkv * nblocks,)
