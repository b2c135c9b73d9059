"""Native decoder layers for the engine's decode-only steps on CPU: one call per layer, or one
for the whole stack.

A decode step's layer is a dozen small kernels (norm, fused q|k|v, RoPE, KV write, paged
attention, o_proj, norm, fused gate|up, SwiGLU, down, two residual adds). Run module by module
from Python, the calls between them cost ~0.18 ms a layer, ~20 % of a batch-1 bench-50m token.
`DecodeBlock` (swapped in for every Block by `DecodeStack`, the ModelRunner's) runs the whole
layer through kernels/decode_layer.c instead, and `DecodeStack` runs all the layers of a step
and the final norm in one call when every block can, when

  * the step is decodes only, through the native paged kernel (AttnMetadata.native.in_order),
    at most native.MAX_LINEAR_ROWS rows, fp32, no autograd;
  * the block is the plain dense layer the engine prepared: its norms, attention and MLP are
    the native swaps, q|k|v and gate|up are fused (ember/model/fused.py) and still valid, RoPE
    (no ALiBi), no hooks, and every weight is still the tensor the plan recorded;
  * or the same layer with all seven projections quantized (ember/quant's modules), each with
    a packed weight the native kernel reads as it is (no column permutation or padding), still
    the one the plan recorded (kernels/quant_linear.c computes them in the layer's call).

Anything else (prefill chunks, MoE, LoRA or partly quantized projections, hooks, a replaced
weight) runs the modules as before; a hook on a block makes the stack give way to per-block calls. The
kernels are the same ones in the same order, so every way gives bit-identical results
(tests/engine/test_fused_layer.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from torch.nn.modules import module as nn_module

from ember.engine import native
from ember.engine.attn_metadata import AttnMetadata
from ember.engine.weight_layout import DecodeAttention, DecodeLinear, DecodeMLP, DecodeRMSNorm
from ember.model.fused import FusedLinears
from ember.model.rope import rope_cos_sin, rope_inv_freq
from ember.model.transformer import Block, CosSin, Transformer

if TYPE_CHECKING:  # ember.quant imports the engine's package: imported where used
    from ember.quant.base import QuantLinear
    from ember.quant.native_layout import PackedWeight


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _global_hooks() -> bool:
    """Whether module hooks registered for every module are set (the stack would skip them for its blocks)."""
    return bool(getattr(nn_module, "_global_forward_hooks", None)
                or getattr(nn_module, "_global_forward_pre_hooks", None))


class LayerPlan:
    """The tensors one block's native call reads, and the checks that they still are the block's."""

    def __init__(self, block: Block, weights: native.LayerWeights, modules: list[nn.Module],
                 params: list[tuple[nn.Module, str, int]], fused: list[tuple[FusedLinears, tuple[nn.Module, ...]]],
                 keep: list[torch.Tensor], packed: list[tuple[QuantLinear, PackedWeight]] | None = None) -> None:
        self.weights = weights
        self.packed = packed or []  # quantized projections and the packed weights the struct points at
        self.modules = modules  # whose hooks would be skipped
        self.children = [(parent, name, parent._modules[name]) for parent in [block, block.self_attn, block.mlp]
                         for name in parent._modules if parent._modules[name] is not None]
        self.params = params  # (module, parameter name, data_ptr) the weights struct points at
        self.fused = fused
        self.keep = keep  # holds the buffers alive as long as the addresses are in use

    @classmethod
    def build(cls, block: Block) -> "LayerPlan | None":
        """A plan for `block`, or None if it is not a layer the native call computes."""
        if not block.llama_block:  # Falcon's and Gemma's blocks: their norms, order and MLP differ
            return None
        attn, mlp = block.self_attn, block._modules.get("mlp")
        n1, n2 = block.input_layernorm, block._modules.get("post_attention_layernorm")
        if not (type(n1) is DecodeRMSNorm and type(n2) is DecodeRMSNorm and type(attn) is DecodeAttention
                and type(mlp) is DecodeMLP and "block_sparse_moe" not in block._modules):
            return None
        from ember.quant.base import QuantLinear

        projs = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if all(isinstance(m, QuantLinear) for m in projs):
            return cls._build_quantized(block, projs)
        if not (type(attn.o_proj) is DecodeLinear and type(mlp.down_proj) is DecodeLinear):
            return None
        spec = attn.spec
        qkv, gu = attn.fused_qkv, mlp.fused_gate_up
        if spec.alibi or spec.head_dim % 2 or qkv is None or gu is None:
            return None
        fused = [(qkv, (attn.q_proj, attn.k_proj, attn.v_proj)), (gu, (mlp.gate_proj, mlp.up_proj))]
        if not all(f.valid(mods) and f.linear is native.linear for f, mods in fused):
            return None
        tensors = {"norm1": n1.weight, "wqkv": qkv.weight, "bqkv": qkv.bias, "wo": attn.o_proj.weight,
                   "bo": attn.o_proj.bias, "norm2": n2.weight, "wgu": gu.weight, "bgu": gu.bias,
                   "wdown": mlp.down_proj.weight, "bdown": mlp.down_proj.bias}
        if not all(t is None or (t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous())
                   for t in tensors.values()):
            return None
        D, H, Hkv, hd = n1.weight.shape[0], spec.num_heads, spec.num_kv_heads, spec.head_dim
        I = mlp.down_proj.in_features
        shapes = {"norm1": (D,), "wqkv": ((H + 2 * Hkv) * hd, D), "bqkv": ((H + 2 * Hkv) * hd,),
                  "wo": (D, H * hd), "bo": (D,), "norm2": (D,), "wgu": (2 * I, D), "bgu": (2 * I,),
                  "wdown": (D, I), "bdown": (D,)}
        if any(t is not None and tuple(t.shape) != shapes[k] for k, t in tensors.items()):
            return None
        weights = native.LayerWeights(
            **{k: (None if t is None else t.data_ptr()) for k, t in tensors.items()},
            D=D, H=H, Hkv=Hkv, hd=hd, I=I, window=spec.sliding_window or 0,
            eps1=n1.eps, eps2=n2.eps, scale=spec.scale)
        params = [(m, name, m._parameters[name].data_ptr())
                  for m in (n1, n2, attn.o_proj, mlp.down_proj) for name in ("weight", "bias")
                  if m._parameters.get(name) is not None]
        modules = [n1, n2, attn, mlp, attn.o_proj, mlp.down_proj]  # q|k|v, gate|up: FusedLinears.valid
        keep = [t for t in tensors.values() if t is not None]
        plan = cls(block, weights, modules, params, fused, keep)
        return plan if plan.valid() else None  # hooks

    @classmethod
    def _build_quantized(cls, block: Block, projs: tuple[QuantLinear, ...]) -> "LayerPlan | None":
        """A plan for a block whose seven projections are quantized, or None."""
        attn, mlp = block.self_attn, block.mlp
        n1, n2 = block.input_layernorm, block.post_attention_layernorm
        spec = attn.spec
        if spec.alibi or spec.head_dim % 2:
            return None
        D, H, Hkv, hd = n1.weight.shape[0], spec.num_heads, spec.num_kv_heads, spec.head_dim
        I = mlp.down_proj.in_features
        shapes = [(H * hd, D), (Hkv * hd, D), (Hkv * hd, D), (D, H * hd), (I, D), (I, D), (D, I)]
        packs = [m.packed_weight() for m in projs]
        if any(pk is None or pk.perm is not None or pk.width != pk.in_features
               or (pk.out_features, pk.in_features) != shape for pk, shape in zip(packs, shapes)):
            return None
        tensors = [n1.weight, n2.weight] + [m.bias for m in projs if m.bias is not None]
        if not all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in tensors) \
                or n2.weight.shape != (D,):
            return None
        proj = (native.QuantProjection * 7)(*[
            native.QuantProjection(pk.code, pk.data.data_ptr(),
                                   None if pk.rscale is None else pk.rscale.data_ptr(),
                                   None if m.bias is None else m.bias.data_ptr()) for m, pk in zip(projs, packs)])
        weights = native.LayerWeights(norm1=n1.weight.data_ptr(), norm2=n2.weight.data_ptr(), D=D, H=H, Hkv=Hkv,
                                      hd=hd, I=I, window=spec.sliding_window or 0, eps1=n1.eps, eps2=n2.eps,
                                      scale=spec.scale, quant=1, proj=proj)
        params = [(m, name, m._parameters[name].data_ptr()) for m in (n1, n2, *projs) for name in ("weight", "bias")
                  if m._parameters.get(name) is not None]
        modules = [n1, n2, attn, mlp, *projs]
        plan = cls(block, weights, modules, params, [], tensors, list(zip(projs, packs)))
        return plan if plan.valid() else None  # hooks

    def valid(self) -> bool:
        """Whether the block still is what the plan recorded: the same modules, no hooks on them,
        the same weights at the same addresses, the fused groups still valid, the quantized
        projections' packed weights still the recorded ones."""
        for parent, name, child in self.children:
            if parent._modules.get(name) is not child:
                return False
        if any(_hooked(m) for m in self.modules):
            return False
        for m, name, ptr in self.params:
            p = m._parameters.get(name)
            if p is None or p.data_ptr() != ptr:
                return False
        if any(m.packed_weight() is not pk for m, pk in self.packed):
            return False
        return all(f.valid(mods) for f, mods in self.fused)


class DecodeBlock(Block):
    """The model's Block, computed by one native call for decode-only steps (module docstring)."""

    _plan: LayerPlan | None = None

    def forward(self, x: torch.Tensor, cos_sin: CosSin | None,
                attn: object) -> tuple[torch.Tensor, torch.Tensor | None]:
        if isinstance(attn, AttnMetadata) and cos_sin is not None:
            y = self._native(x, cos_sin, attn)
            if y is not None:
                return y, None
        return super().forward(x, cos_sin, attn)

    def plan(self) -> LayerPlan | None:
        """This block's plan, rebuilt when the block changed since it was made (None: the block
        is not one the native call computes)."""
        plan = self._plan
        if plan is None or not plan.valid():
            plan = self._plan = LayerPlan.build(self)
        return plan

    def _native(self, x: torch.Tensor, cos_sin: CosSin, meta: AttnMetadata) -> torch.Tensor | None:
        plan = self.plan()
        spec = self.self_attn.spec
        call = _step_call(x, cos_sin, meta, spec.num_heads) if plan is not None else None
        return None if call is None else call(plan.weights, x, spec.layer_idx)


def _step_call(x: torch.Tensor, cos_sin: CosSin, meta: AttnMetadata, num_heads: int) -> native.DecodeLayerCall | None:
    """The step's DecodeLayerCall (made by the first layer that asks), or None if the step and x
    are not what the native layer computes."""
    nat = meta.native
    if nat is None or not nat.in_order or torch.is_grad_enabled() or x.dtype != torch.float32 \
            or not x.is_contiguous() or x.device.type != "cpu":
        return None
    call = nat.layer_call
    if call is None or call.keep[0] is not cos_sin[0] or call.keep[1] is not cos_sin[1]:
        cos, sin = cos_sin
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if not 0 < rows <= native.MAX_LINEAR_ROWS or cos.dtype != torch.float32 or sin.dtype != torch.float32 \
                or not (cos.is_contiguous() and sin.is_contiguous()):
            return None
        call = nat.layer_call = native.DecodeLayerCall(
            rows, cos, sin, meta.kv_cache, meta.slot_rows, nat.tables, nat.lens, num_heads,
            nat.scratch(num_heads, meta.block_size), lambda n: nat.buffer("layer", n))
    return call


class DecodeStack:
    """A decode-only step's whole decoder stack in one native call (the ModelRunner asks first).

    Transformer.hidden calls each block from Python, and on CPU the Python between the layers'
    native calls runs slowly: the layers' weight streaming has just evicted its code and data
    from the caches (~50 us a layer measured, against ~8 us in a warm loop). When every block is
    a DecodeBlock with a valid plan and no hooks, `hidden` computes the same as
    Transformer.hidden (embedding and final norm as modules, the blocks in one call), bit for
    bit; otherwise it returns None and the runner calls the model's own.
    """

    def __init__(self, model: Transformer) -> None:
        """For `model` as relayout_for_decode left it: with the native kernels, its exact Blocks
        become DecodeBlocks (in place; only forward changes)."""
        self.model = model
        if native.available() and next(model.parameters()).device.type == "cpu":
            for module in model.modules():
                if type(module) is Block:
                    module.__class__ = DecodeBlock
        self.plans: list[LayerPlan] = []
        self.layers: native.LayerStack | None = None
        self.inv_freq: torch.Tensor | None = None  # RoPE's frequencies, computed once (rope_cos_sin)

    def hidden(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttnMetadata) -> torch.Tensor | None:
        """Final-norm hidden states (1, N, D), or None where the stack cannot run as one call."""
        model = self.model
        nat = meta.native
        if nat is None or not nat.in_order or not 0 < input_ids.numel() <= native.MAX_LINEAR_ROWS \
                or type(model).hidden is not Transformer.hidden or not model.config.llama_block or _global_hooks():
            return None
        plans = []
        for block in model.model.layers:
            if type(block) is not DecodeBlock or _hooked(block):
                return None
            plan = block.plan()
            if plan is None:
                return None
            plans.append(plan)
        if not plans:
            return None
        x = model.model.embed_tokens(input_ids)
        if self.inv_freq is None or self.inv_freq.device != positions.device:
            self.inv_freq = rope_inv_freq(model.config, None, positions.device)
        cos_sin = rope_cos_sin(model.config, positions, x.dtype, self.inv_freq)
        call = _step_call(x, cos_sin, meta, model.model.layers[0].self_attn.spec.num_heads)
        norm = model.model.norm
        if call is None:  # e.g. an embedding of another dtype: the blocks one by one, as Transformer.hidden
            for block in model.model.layers:
                x, _ = block(x, cos_sin, meta)
            return norm(x)
        # The same plan objects (not just equal ids: a freed plan's id can be reused) -> the same arrays.
        if self.layers is None or len(plans) != len(self.plans) or any(a is not b for a, b in zip(plans, self.plans)):
            self.plans = plans
            self.layers = native.LayerStack([p.weights for p in plans],
                                            [b.self_attn.spec.layer_idx for b in model.model.layers])
        weight = norm._parameters.get("weight")
        if type(norm) is DecodeRMSNorm and not _hooked(norm) and weight is not None \
                and weight.dtype == torch.float32 and weight.is_contiguous():
            return call.stack(self.layers, x, weight, norm.eps)  # the final norm in the same call
        return norm(call.stack(self.layers, x))
