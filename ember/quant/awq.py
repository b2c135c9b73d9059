"""AWQ (Lin et al. 2023): protect the weights that meet large activations by scaling them up
before rounding, with the inverse scale folded into the operation that feeds them.

For linears sharing one input x (e.g. q/k/v after the input RMSNorm), a per-input-channel
scale s multiplies their weight columns and divides the preceding op's output:

    y = W x = (W diag(s)) (diag(s)^-1 x)      prev RMSNorm weight /= s   or   prev linear rows /= s
                                              Gemma's (1 + w) norm: 1 + w <- (1 + w) / s
                                              LayerNorm (Falcon): weight /= s and bias /= s

so the float model is unchanged while Q(W diag(s)) rounds salient columns more finely.
s = mean|x|^alpha (normalised so sqrt(max * min) = 1) with alpha from a 20-point grid on [0, 1)
minimising the squared output error of the block part that consumes x (attention, MLP,
o_proj, down_proj) on calibration data. The scaling groups of a block:

    input_layernorm          -> q, k, v          (judged on the attention output)
    v_proj                   -> o_proj           (only without GQA: v and o channels must pair)
    post_attention_layernorm -> gate, up         (MLP output; Mixtral: router + every w1, w3;
                                                  Gemma 3: pre_feedforward_layernorm, its MLP's norm)
    up_proj                  -> down_proj        (Mixtral: each expert's w3 -> w2)

Falcon's blocks: with one LayerNorm for both branches (Falcon-7B) q, k, v and up share its output and
are scaled together, judged on attention + MLP; with two (the new decoder architecture) or the
sequential block, each norm feeds its branch as above. Its MLP has no up_proj -> down_proj group:
GELU sits between them, and a scale does not pass through it (down_proj is rounded unscaled).

Then, optionally, each weight's per-group clipping range is shrunk (up to 50 %, 20-point grid)
where that lowers the group's output error (q and k are left unclipped), and the weights are
rounded group-wise as RTN does. Block outputs for the next block come from the float block,
as in the reference implementation.

    results = awq_quantize_model(model, calibration_ids, linears, bits=4, group_size=128)
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from ember.model.transformer import OffsetRMSNorm, RMSNorm
from ember.quant.calibration import BlockRunner, InputCapture
from ember.quant.rtn import GroupQuantized, fake_quantize, group_params, rtn_quantize

log = logging.getLogger(__name__)

Inspect = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class ScaleGroup:
    """Linears that share one input, the op producing it, and the block part judged on it."""

    prev: nn.Module
    linears: list[str]  # full names; all get their columns scaled
    inspect: Inspect
    input_of: str  # the linear whose captured input is the group's input


def _batched(fn: Inspect, x: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([fn(x[i:i + rows]) for i in range(0, len(x), rows)])


def scale_groups(layer: nn.Module, prefix: str, cos_sin) -> list[ScaleGroup]:
    """The scaling groups of one block, in the order its inputs are computed (see the module docstring)."""
    attn = layer.self_attn
    qkv = [f"{prefix}self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
    mlp = layer._modules.get("mlp")
    up = [f"{prefix}mlp.{p}" for p in (("gate_proj", "up_proj") if hasattr(mlp, "gate_proj") else ("up_proj",))]
    one_norm = layer.parallel and "post_attention_layernorm" not in layer._modules  # Falcon-7B's block
    if one_norm:
        groups = [ScaleGroup(layer.input_layernorm, qkv + up, lambda h: attn(h, cos_sin, None) + mlp(h),
                             f"{prefix}self_attn.q_proj")]
    else:
        groups = [ScaleGroup(layer.input_layernorm, qkv, lambda h: attn(h, cos_sin, None), f"{prefix}self_attn.q_proj")]
    if attn.v_proj.out_features == attn.o_proj.in_features:
        groups.append(ScaleGroup(attn.v_proj, [f"{prefix}self_attn.o_proj"], attn.o_proj, f"{prefix}self_attn.o_proj"))
    if mlp is not None:
        if not one_norm:
            norm = layer.pre_feedforward_layernorm if layer.sandwich else layer.post_attention_layernorm
            groups.append(ScaleGroup(norm, up, mlp, up[0]))
        if hasattr(mlp, "gate_proj"):  # gated: down_proj's input is linear in up_proj's output
            groups.append(ScaleGroup(mlp.up_proj, [f"{prefix}mlp.down_proj"], mlp.down_proj, f"{prefix}mlp.down_proj"))
    else:
        moe = layer.block_sparse_moe
        names = [f"{prefix}block_sparse_moe.gate"]
        names += [f"{prefix}block_sparse_moe.experts.{e}.{w}" for e in range(len(moe.experts)) for w in ("w1", "w3")]
        groups.append(ScaleGroup(layer.post_attention_layernorm, names, lambda h: moe(h)[0],
                                 f"{prefix}block_sparse_moe.gate"))
        for e, expert in enumerate(moe.experts):
            name = f"{prefix}block_sparse_moe.experts.{e}.w2"
            groups.append(ScaleGroup(expert.w3, [name], expert.w2, name))
    return groups


def search_scale(group: ScaleGroup, x: torch.Tensor, modules: dict[str, nn.Linear], quantized: set[str],
                 bits: int, group_size: int, n_grid: int = 20, batch: int = 16) -> torch.Tensor:
    """The per-channel scale s = mean|x|^alpha with the grid's best alpha for this group."""
    rows = batch if x.dim() == 3 else batch * 512
    x_mean = x.abs().reshape(-1, x.shape[-1]).float().mean(0)
    reference = _batched(group.inspect, x, rows)
    originals = {n: modules[n].weight.detach().clone() for n in group.linears}
    best_loss, best = float("inf"), torch.ones_like(x_mean)
    for step in range(n_grid):
        s = x_mean.pow(step / n_grid).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        for n, w in originals.items():
            scaled = w * s.view(1, -1)
            if n in quantized:
                scaled = rtn_quantize(scaled, bits, group_size).dequantize()
            modules[n].weight.copy_(scaled / s.view(1, -1))
        loss = (_batched(group.inspect, x, rows) - reference).float().pow(2).mean().item()
        if loss < best_loss:
            best_loss, best = loss, s
    for n, w in originals.items():
        modules[n].weight.copy_(w)
    return best


def apply_scale(group: ScaleGroup, s: torch.Tensor, modules: dict[str, nn.Linear]) -> None:
    prev = group.prev
    if isinstance(prev, RMSNorm):
        prev.weight.div_(s)
    elif isinstance(prev, OffsetRMSNorm):  # scales by 1 + weight
        prev.weight.copy_((1 + prev.weight) / s - 1)
    elif isinstance(prev, nn.LayerNorm):
        prev.weight.div_(s)
        prev.bias.div_(s)
    else:
        prev.weight.div_(s.view(-1, 1))
        if prev.bias is not None:
            prev.bias.div_(s)
    for n in group.linears:
        modules[n].weight.mul_(s.view(1, -1))


def search_clip(w: torch.Tensor, x: torch.Tensor, bits: int, group_size: int, n_grid: int = 20,
                max_shrink: float = 0.5, n_tokens: int = 512, oc_batch: int = 32) -> torch.Tensor:
    """Per (output row, group) clipping bound that minimises the group's output error."""
    out_f, in_f = w.shape
    x = x.reshape(-1, in_f)
    x = x[::max(1, len(x) // n_tokens)][:n_tokens].float()
    ng = in_f // group_size
    xg = x.view(1, -1, ng, group_size)
    bounds = []
    for o in range(0, out_f, oc_batch):
        wb = w[o:o + oc_batch].float().view(-1, 1, ng, group_size)
        org_max = wb.abs().amax(dim=-1, keepdim=True)  # (oc, 1, ng, 1)
        best = org_max.clone()
        min_err = torch.full(org_max.shape, float("inf"))
        org_out = (xg * wb).sum(dim=-1, keepdim=True)  # (oc, tokens, ng, 1)
        for i in range(int(max_shrink * n_grid)):
            bound = org_max * (1 - i / n_grid)
            cur = torch.clamp(wb, -bound, bound).reshape(-1, group_size)
            scale, zero = group_params(cur, bits)
            q = fake_quantize(cur, scale, zero, bits).view(wb.shape)
            err = ((xg * q).sum(dim=-1, keepdim=True) - org_out).pow(2).mean(dim=1, keepdim=True)
            better = err < min_err
            min_err = torch.where(better, err, min_err)
            best = torch.where(better, bound, best)
        bounds.append(best.view(-1, ng))
    return torch.cat(bounds)  # (out, ng)


@torch.no_grad()
def awq_quantize_model(model: nn.Module, input_ids: torch.Tensor, linears: dict[str, nn.Linear], bits: int,
                       group_size: int, n_grid: int = 20, clip: bool = True) -> dict[str, GroupQuantized]:
    """AWQ for every layer in `linears`; scales are folded into the model, weights rounded in place."""
    runner = BlockRunner(model, input_ids)
    results: dict[str, GroupQuantized] = {}
    all_linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for idx, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{idx}."
        groups = scale_groups(layer, prefix, runner.cos_sin(layer))
        mine = {n: m for n, m in linears.items() if n.startswith(prefix)}
        watched = {g.input_of for g in groups} | set(mine)
        captured: dict[str, list[torch.Tensor]] = defaultdict(list)
        with InputCapture({n: all_linears[n] for n in watched}, lambda n, x: captured[n].append(x)):
            next_hidden = runner.run(layer)
        inputs = {n: torch.cat(v) for n, v in captured.items()}
        live = [g for g in groups if g.input_of in inputs]  # a Mixtral expert may get no token
        scales = [search_scale(g, inputs[g.input_of], all_linears, set(mine), bits, group_size, n_grid)
                  for g in live]
        for g, s in zip(live, scales):
            apply_scale(g, s, all_linears)
            for n in g.linears:
                if n in inputs:
                    inputs[n] = inputs[n] / s
        for name, module in mine.items():
            gs = module.in_features if group_size == -1 else group_size
            if clip and name in inputs and not name.endswith(("q_proj", "k_proj")) and module.in_features % gs == 0:
                bound = search_clip(module.weight, inputs[name], bits, gs).repeat_interleave(gs, 1)
                module.weight.copy_(torch.clamp(module.weight, -bound, bound))
            gq = rtn_quantize(module.weight, bits, group_size)
            results[name] = gq
            module.weight.copy_(gq.dequantize(module.weight.dtype))
        runner.hidden = next_hidden
        log.info("AWQ: block %d/%d done", idx + 1, len(model.model.layers))
    return results
