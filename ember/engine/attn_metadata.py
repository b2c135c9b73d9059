"""Paged attention for the engine: K/V written to and read from fixed-size blocks of one pool.

The pool is one preallocated tensor for all layers,
    kv_cache (layers, 2, num_blocks, Hkv, block_size, D)       2 = keys, values
and a step's batch is flattened to N tokens, so the model sees q (1, N, H, D), k/v (1, N, Hkv, D).
`AttnMetadata` implements the model's AttentionBackend protocol (ember/model/attention.py):

    attend(q, k, v, spec):
      1. write this step's k/v into the pool at each token's slot (block, offset)
      2. decode queries (one new token per sequence) run as batched SDPAs over the sequences'
         blocks gathered into a padded workspace, keys past each sequence's length masked; up
         to 4 groups of similar length limit the padding; GQA without copies by viewing the
         rep query heads of a KV head as its queries
      3. prefill chunks attend one sequence at a time: a fresh prompt uses its own k/v (causal
         SDPA), a chunk after cached tokens gathers its blocks and uses a positional mask

The gather reuses one growing workspace instead of fresh tensors: on CPU, touching newly
mapped pages every layer costs more than the attention itself. Masks follow `position_bias`:
sliding windows and ALiBi work in both paths. All index tensors are built once per step and
shared by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ember.config import ModelConfig
from ember.model.attention import AttnSpec, position_bias, sdpa
from ember.model.rope import alibi_slopes


def allocate_kv_cache(cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                      device: torch.device | str) -> torch.Tensor:
    """The block pool: (layers, 2, num_blocks, Hkv, block_size, D), uninitialized.

    Pages are touched only when blocks are first used (the runner zeroes a block then), so
    a large budget costs no memory until requests need it.
    """
    shape = (cfg.num_layers, 2, num_blocks, cfg.n_kv_heads, block_size, cfg.d_head)
    return torch.empty(shape, dtype=dtype, device=device)


class Workspace:
    """A reusable buffer for gathered K/V, grown on demand (see the module docstring)."""

    def __init__(self) -> None:
        self.buf: torch.Tensor | None = None

    def get(self, numel: int, like: torch.Tensor) -> torch.Tensor:
        if self.buf is None or self.buf.numel() < numel or self.buf.dtype != like.dtype \
                or self.buf.device != like.device:
            self.buf = torch.empty(numel, dtype=like.dtype, device=like.device)
        return self.buf[:numel]


@dataclass
class PrefillSeq:
    """One sequence computing more than one token: flat rows [start, end), positions from pos0."""

    start: int
    end: int
    pos0: int  # tokens already in the cache before this chunk
    gather_rows: torch.Tensor | None  # (Hkv * nblocks,) pool rows of its blocks, None if pos0 == 0


@dataclass
class DecodeBatch:
    """Decode queries attending together: one padded gather and one SDPA per layer."""

    rows: torch.Tensor  # (Bd,) flat index of each query
    pos: torch.Tensor  # (Bd,) position of each query
    gather_rows: torch.Tensor  # (Bd * Hkv * nblocks,) pool rows, sequences padded to nblocks
    nblocks: int
    bias: dict = field(default_factory=dict)  # masks per (window, alibi, heads), built once per step


def split_by_length(nblocks: list[int], max_groups: int = 4, min_size: int = 4) -> list[list[int]]:
    """Indices grouped by similar length (longest first), so padding to a group's longest is cheap."""
    order = sorted(range(len(nblocks)), key=lambda i: -nblocks[i])
    groups: list[list[int]] = []
    for i in order:
        g = groups[-1] if groups else None
        if g is None or (len(groups) < max_groups and len(g) >= min_size and nblocks[i] < 0.7 * nblocks[g[0]]):
            groups.append([i])
        else:
            g.append(i)
    return [sorted(g) for g in groups]  # batch order inside a group


@dataclass
class AttnMetadata:
    """Everything attention needs about one flattened step; implements AttentionBackend."""

    kv_cache: torch.Tensor
    block_size: int
    slot_block: torch.Tensor  # (N,) block of each token
    slot_offset: torch.Tensor  # (N,) offset inside its block
    prefills: list[PrefillSeq]
    decodes: list[DecodeBatch]
    workspace: Workspace = field(default_factory=Workspace)

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
        decodes = []
        for group in split_by_length([len(t) for t in dec_tables]):
            width = max(len(dec_tables[i]) for i in group)
            padded = torch.tensor([dec_tables[i] + [dec_tables[i][-1]] * (width - len(dec_tables[i]))
                                   for i in group])  # (Bd, width)
            decodes.append(DecodeBatch(torch.tensor([dec_rows[i] for i in group], device=dev),
                                       torch.tensor([dec_pos[i] for i in group], device=dev),
                                       _gather_rows(padded, hkv).to(dev), width))
        return cls(kv_cache, block_size, torch.tensor(blocks, device=dev), torch.tensor(offsets, device=dev),
                   prefills, decodes, workspace)

    # ---- the AttentionBackend protocol ----------------------------------------------------------
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttnSpec) -> torch.Tensor:
        kc, vc = self.kv_cache[spec.layer_idx]  # (num_blocks, Hkv, bs, D) each
        kc[self.slot_block, :, self.slot_offset] = k[0]
        vc[self.slot_block, :, self.slot_offset] = v[0]
        if len(self.decodes) == 1 and not self.prefills and self.decodes[0].rows.numel() == q.shape[1]:
            return self._decode(q[0], kc, vc, spec, self.decodes[0]).unsqueeze(0)  # rows are 0..N-1
        out = torch.empty_like(q[0])  # (N, H, D)
        for d in self.decodes:
            out[d.rows] = self._decode(q[0, d.rows], kc, vc, spec, d)
        for p in self.prefills:
            out[p.start:p.end] = self._prefill(q[:, p.start:p.end], k[:, p.start:p.end],
                                               v[:, p.start:p.end], p, kc, vc, spec)[0]
        return out.unsqueeze(0)

    # ---- decode: one batched SDPA ---------------------------------------------------------------
    def _decode(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, spec: AttnSpec,
                d: DecodeBatch) -> torch.Tensor:
        """q (Bd, H, D) -> (Bd, H, D), each query attending over its own blocks."""
        Bd, hkv, D = q.shape[0], spec.num_kv_heads, spec.head_dim
        S = d.nblocks * self.block_size
        keys, values = self._gather(kc, vc, d.gather_rows, (Bd, hkv, S, D))
        rep = spec.num_heads // hkv
        qg = q.view(Bd, hkv, rep, D)  # the rep query heads sharing a KV head act as its queries
        y = torch.nn.functional.scaled_dot_product_attention(qg, keys, values, attn_mask=self._decode_bias(spec, S, d),
                                                             scale=spec.scale)
        return y.reshape(Bd, spec.num_heads, D)

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
                bias = torch.zeros(dist.shape, dtype=self.kv_cache.dtype, device=pos.device)
                bias.masked_fill_(~visible, float("-inf"))
                bias = bias[:, None, None, :]  # (Bd, 1, 1, S)
                if spec.alibi:
                    slopes = alibi_slopes(spec.num_heads, pos.device).to(bias.dtype)
                    slopes = slopes.view(1, spec.num_kv_heads, -1, 1)  # (1, Hkv, rep, 1)
                    bias = bias - slopes * dist[:, None, None, :].to(bias.dtype)
            d.bias[key] = bias
        return d.bias[key]

    # ---- prefill: per sequence -------------------------------------------------------------------
    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: PrefillSeq,
                 kc: torch.Tensor, vc: torch.Tensor, spec: AttnSpec) -> torch.Tensor:
        T = p.end - p.start
        if p.gather_rows is None:  # the chunk holds every key it needs
            if spec.sliding_window is None and not spec.alibi:
                return sdpa(q, k, v, spec, None, is_causal=True)
            keys, values, k_len = k, v, T
        else:
            k_len = p.pos0 + T
            nb = p.gather_rows.numel() // spec.num_kv_heads
            shape = (1, spec.num_kv_heads, nb * self.block_size, spec.head_dim)
            keys, values = self._gather(kc, vc, p.gather_rows, shape)
            keys, values = keys[:, :, :k_len].transpose(1, 2), values[:, :, :k_len].transpose(1, 2)
        q_pos = torch.arange(p.pos0, p.pos0 + T, device=q.device)[None]
        k_pos = torch.arange(k_len, device=q.device)[None]
        return sdpa(q, keys, values, spec, position_bias(spec, q_pos, k_pos, q.dtype), is_causal=False)

    def _gather(self, kc: torch.Tensor, vc: torch.Tensor, rows: torch.Tensor,
                shape: tuple[int, int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy the listed pool rows of keys and values into the workspace, viewed as shape."""
        n = rows.numel() * self.block_size * kc.shape[-1]
        ws = self.workspace.get(2 * n, kc)
        flat_k = kc.view(-1, self.block_size, kc.shape[-1])  # (num_blocks * Hkv, bs, D)
        flat_v = vc.view(-1, self.block_size, vc.shape[-1])
        keys = torch.index_select(flat_k, 0, rows, out=ws[:n].view(-1, self.block_size, kc.shape[-1]))
        values = torch.index_select(flat_v, 0, rows, out=ws[n:].view(-1, self.block_size, vc.shape[-1]))
        return keys.view(shape), values.view(shape)


def _gather_rows(tables: torch.Tensor, hkv: int) -> torch.Tensor:
    """Pool rows (block * Hkv + head) in (seq, head, block) order: the gather is then contiguous."""
    heads = torch.arange(hkv)
    return (tables[:, None, :] * hkv + heads[None, :, None]).reshape(-1)  # (B * Hkv * nblocks,)
