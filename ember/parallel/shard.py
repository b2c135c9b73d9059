"""Cut one rank's tensor-parallel shard out of a loaded Transformer, in place (Megatron's splits).

    attention   q/k/v by columns: each rank owns whole GQA groups (KV heads and the query heads
                reading them; 3 KV heads over 2 ranks: 2 and 1, as SmolLM2's 9/3 heads need), so
                its KV pool holds only its heads (fewer KV heads than ranks: the query heads are
                split, and each rank holds a copy of the KV head its queries read, as vLLM does);
                o_proj by rows (its input columns), then one all-reduce
    MLP         gate/up by columns, down by rows, one all-reduce (Falcon's up/down the same)
    pipeline    with pipeline parallel, first this stage's contiguous layers (renumbered from 0),
                the embedding only on the first stage, the LM head only on the last
    MoE         every expert split as an MLP, one all-reduce of the layer's sum; or with expert
                parallel, whole experts per rank (ExpertParallelMoE), the same one all-reduce
    vocabulary  the embedding's and the LM head's rows split (a tied head stays tied); lookups
                all-reduced, logits gathered

Weights are cut by whole output rows, or by input columns. Packed quantized weights (GGUF
Q8_0/Q4_0/Q4_1 blocks, INT8 rows) cut the same way, an input-column cut only on 32-weight block
boundaries; LoRA wrappers cut their base and the matching side of A or B. Anything else is refused
with one line naming the layer. A row-parallel bias is kept by rank 0 alone (added once).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
from torch.distributed import ProcessGroup

from ember.config import ModelConfig
from ember.model.transformer import MoE, Transformer
from ember.parallel.group import ParallelError, ParallelGroup
from ember.parallel.layers import (
    CommStats,
    ExpertParallelMoE,
    VocabParallelEmbedding,
    add_all_reduce,
    add_logits_gather,
)

GGUF_BLOCK = 32  # weights per GGUF block (and per INT8 kernel block)


def part(n: int, world: int, rank: int, what: str) -> tuple[int, int]:
    """[lo, hi) of rank's share of n things: contiguous, shares differing by one at most (9 heads
    over 2 ranks: 5 and 4), none empty."""
    if n < world:
        raise ParallelError(f"{what} ({n}) cannot be split over {world} ranks: use at most {n}")
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def vocab_sizes(vocab: int, world: int) -> list[int]:
    """Each rank's number of vocabulary rows (part's shares)."""
    return [hi - lo for lo, hi in (part(vocab, world, r, "the vocabulary") for r in range(world))]


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.contiguous().clone(), requires_grad=False)


def slice_linear(module: nn.Module, lo: int, hi: int, dim: int, name: str) -> None:
    """Keep output rows (dim 0) or input columns (dim 1) [lo, hi) of a linear layer, in place."""
    from ember.adapters.lora import LoRALinear
    from ember.quant.gguf_linear import GGUF_BLOCK_BYTES, GGUFLinear
    from ember.quant.linear import Int8Linear

    n = hi - lo
    if isinstance(module, LoRALinear):
        slice_linear(module.base_layer, lo, hi, dim, name)
        side = module.lora_B if dim == 0 else module.lora_A
        side.weight = _param(side.weight[lo:hi] if dim == 0 else side.weight[:, lo:hi])
        if dim == 0:
            module.out_features = side.out_features = n
        else:
            module.in_features = side.in_features = n
        return
    if isinstance(module, nn.Linear):
        w = module.weight
        module.weight = _param(w[lo:hi] if dim == 0 else w[:, lo:hi])
        if dim == 0 and module.bias is not None:
            module.bias = _param(module.bias[lo:hi])
    elif isinstance(module, GGUFLinear):
        if dim == 1:
            if lo % GGUF_BLOCK or hi % GGUF_BLOCK:
                raise ParallelError(f"{name}: its {module.ggml_type} blocks hold {GGUF_BLOCK} inputs each, and a "
                                    f"split at columns {lo}..{hi} would cut blocks: pick a tensor parallel "
                                    f"size that gives each rank a multiple of {GGUF_BLOCK} of its "
                                    f"{module.in_features} inputs")
            b = GGUF_BLOCK_BYTES[module.ggml_type]
            module.blocks = module.blocks[:, lo // GGUF_BLOCK * b:hi // GGUF_BLOCK * b].contiguous()
        else:
            module.blocks = module.blocks[lo:hi].contiguous()
            if module.bias is not None:
                module.bias = _param(module.bias[lo:hi])
    elif isinstance(module, Int8Linear):  # one scale per output row: rows and columns both cut freely
        module.weight = (module.weight[lo:hi] if dim == 0 else module.weight[:, lo:hi]).contiguous()
        if dim == 0:
            module.SCB = module.SCB[lo:hi].contiguous()
            if module.bias is not None:
                module.bias = _param(module.bias[lo:hi])
        module._unit_scale = None
    else:
        raise ParallelError(f"{name}: tensor parallel splits nn.Linear, GGUF Q8_0/Q4_0/Q4_1, INT8 and LoRA "
                            f"layers, not {type(module).__name__}; dequantize the model (keep_quantized=False)")
    if dim == 0:
        module.out_features = n
    else:
        module.in_features = n


def row_parallel(module: nn.Module, lo: int, hi: int, rank: int, name: str, group: ProcessGroup | None,
                 stats: CommStats) -> None:
    """Keep input columns [lo, hi), the bias on rank 0 only, and sum the output over the ranks."""
    slice_linear(module, lo, hi, 1, name)
    if rank:
        base = getattr(module, "base_layer", module)
        if getattr(base, "bias", None) is not None:
            base.bias = None
    add_all_reduce(module, group, stats)


def head_ranges(rank: int, world: int, num_heads: int, num_kv_heads: int) -> tuple[int, int, int, int]:
    """(q_lo, q_hi, kv_lo, kv_hi): the query heads rank owns and the KV heads they read. With at
    least as many KV heads as ranks, whole GQA groups are split (unevenly where they do not
    divide); with fewer, each rank's queries read one KV head, replicated on the ranks that share it."""
    group = num_heads // num_kv_heads
    if num_kv_heads >= world:
        kv_lo, kv_hi = part(num_kv_heads, world, rank, "the number of KV heads")
        return kv_lo * group, kv_hi * group, kv_lo, kv_hi
    if world % num_kv_heads or num_heads % world:
        raise ParallelError(f"{num_kv_heads} KV heads and {num_heads} query heads over {world} ranks: the tensor "
                            "parallel size must divide the query heads and be a multiple of the KV heads")
    q_lo, q_hi = part(num_heads, world, rank, "the number of attention heads")
    return q_lo, q_hi, q_lo // group, q_lo // group + 1


def check_splittable(cfg: ModelConfig, tp: int, pp: int, expert_parallel: bool) -> None:
    """Refuse, before any process starts, a model whose heads, layers, vocabulary or experts cannot
    be split this way (quantized blocks are checked as they are cut)."""
    part(cfg.num_layers, pp, 0, "the model's layers")
    if tp > 1:
        for rank in range(tp):
            head_ranges(rank, tp, cfg.num_heads, cfg.n_kv_heads)
        part(cfg.vocab_size, tp, 0, "the vocabulary")
        part(cfg.num_experts if cfg.is_moe and expert_parallel else cfg.intermediate_size, tp, 0,
             "the number of experts" if cfg.is_moe and expert_parallel else "the MLP's intermediate size")


def shard_model(model: Transformer, group: ParallelGroup, expert_parallel: bool = False) -> None:
    """Turn `model` into this rank's shard (module docstring), in place: its pipeline stage's
    layers (renumbered from 0, so its KV pool holds only them), split across the stage's ranks."""
    cfg = model.config
    lo, hi = part(cfg.num_layers, group.pp, group.stage, "the model's layers")
    first, last = group.stage == 0, group.stage == group.pp - 1
    if group.pp > 1:
        layers = list(model.model.layers)[lo:hi]
        for i, layer in enumerate(layers):
            layer.self_attn.spec = dataclasses.replace(layer.self_attn.spec, layer_idx=i)
        model.model.layers = nn.ModuleList(layers)
        if not first:
            model.model.embed_tokens = nn.Identity()  # a later stage receives hidden states
        if not last:
            model.lm_head = nn.Identity()
        cfg = cfg.replace(num_layers=hi - lo, layer_types=cfg.layer_types[lo:hi])
    if group.tp > 1:
        cfg = _split_tensors(model, cfg, group, expert_parallel, lo, first, last)
    model.config = cfg


def _split_tensors(model: Transformer, cfg: ModelConfig, group: ParallelGroup, expert_parallel: bool,
                   first_layer: int, first: bool, last: bool) -> ModelConfig:
    rank, world, pg, stats = group.tp_rank, group.tp, group.tp_group, group.comm
    hd = cfg.d_head
    q_lo, q_hi, kv_lo, kv_hi = head_ranges(rank, world, cfg.num_heads, cfg.n_kv_heads)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            at = f"model.layers.{first_layer + i}"
            attn = layer.self_attn
            slice_linear(attn.q_proj, q_lo * hd, q_hi * hd, 0, f"{at}.self_attn.q_proj")
            for proj in ("k_proj", "v_proj"):
                slice_linear(getattr(attn, proj), kv_lo * hd, kv_hi * hd, 0, f"{at}.self_attn.{proj}")
            row_parallel(attn.o_proj, q_lo * hd, q_hi * hd, rank, f"{at}.self_attn.o_proj", pg, stats)
            attn.spec = dataclasses.replace(attn.spec, num_heads=q_hi - q_lo, num_kv_heads=kv_hi - kv_lo,
                                            head_offset=q_lo, total_heads=cfg.num_heads)
            attn.fused_qkv = None
            moe = layer._modules.get("block_sparse_moe")
            if moe is not None:
                _shard_moe(moe, rank, world, expert_parallel, f"{at}.block_sparse_moe", pg, stats)
                continue
            mlp = layer.mlp
            lo, hi = part(mlp.down_proj.in_features, world, rank, "the MLP's intermediate size")
            for proj in ("gate_proj", "up_proj"):
                if proj in mlp._modules:
                    slice_linear(mlp._modules[proj], lo, hi, 0, f"{at}.mlp.{proj}")
            row_parallel(mlp.down_proj, lo, hi, rank, f"{at}.mlp.down_proj", pg, stats)
            if hasattr(mlp, "fused_gate_up"):
                mlp.fused_gate_up = None
        _shard_vocab(model, rank, world, pg, first, last)
    return cfg.replace(num_heads=q_hi - q_lo, num_kv_heads=kv_hi - kv_lo, head_dim=hd)


def _shard_moe(moe: MoE, rank: int, world: int, expert_parallel: bool, name: str, pg: ProcessGroup | None,
               stats: CommStats) -> None:
    if expert_parallel:
        lo, hi = part(len(moe.experts), world, rank, "the number of experts")
        for e in range(len(moe.experts)):
            if not lo <= e < hi:
                moe.experts[e] = nn.Identity()  # another rank's expert: its weights are freed here
        moe.__class__ = ExpertParallelMoE
        moe.local_experts = frozenset(range(lo, hi))
    else:
        for e, expert in enumerate(moe.experts):
            lo, hi = part(expert.w2.in_features, world, rank, "the experts' intermediate size")
            slice_linear(expert.w1, lo, hi, 0, f"{name}.experts.{e}.w1")
            slice_linear(expert.w3, lo, hi, 0, f"{name}.experts.{e}.w3")
            slice_linear(expert.w2, lo, hi, 1, f"{name}.experts.{e}.w2")
    add_all_reduce(moe, pg, stats)


def _shard_vocab(model: Transformer, rank: int, world: int, pg: ProcessGroup | None, first: bool, last: bool) -> None:
    """Split the embedding (first stage) and the LM head (last stage) by vocabulary rows."""
    from ember.quant.gguf_embedding import GGUFEmbedding

    emb, head = model.model.embed_tokens, model.lm_head
    vocab = model.config.vocab_size
    sizes = vocab_sizes(vocab, world)
    lo = sum(sizes[:rank])
    hi = lo + sizes[rank]
    tied = False
    if first:
        if isinstance(emb, nn.Embedding):
            tied = getattr(head, "weight", None) is emb.weight
            inner: nn.Module = nn.Embedding(hi - lo, emb.embedding_dim, _weight=emb.weight[lo:hi].clone(),
                                            _freeze=True)
            if tied:
                head.weight = inner.weight
        elif isinstance(emb, GGUFEmbedding):
            tied = getattr(head, "blocks", None) is emb.blocks
            inner = GGUFEmbedding(emb.blocks[lo:hi].contiguous(), emb.ggml_type, (hi - lo, emb.embedding_dim),
                                  emb.dtype)
            if tied:
                head = model.lm_head = inner.tied_head()
        else:
            raise ParallelError(f"tensor parallel splits an nn.Embedding or GGUF embedding, not {type(emb).__name__}")
        model.model.embed_tokens = VocabParallelEmbedding(inner, lo, hi, vocab, pg)
    if not last:
        return
    if tied:
        head.out_features = hi - lo
    else:
        slice_linear(head, lo, hi, 0, "lm_head")
    add_logits_gather(head, sizes, pg)
