"""The one-call native decoder layers and stack (ember/engine/fused_layer.py, kernels/decode_layer.c).

They run the same kernels in the same order as the module-by-module path, so the engine's
outputs must be bit-identical with them and without them; they must be used for decode steps of
plain dense layers, and give way whenever a layer is no longer what its plan recorded.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ember.config import preset
from ember.engine import LLM, SamplingParams, native
from ember.engine.fused_layer import DecodeBlock, LayerPlan
from tests.engine.conftest import spread_model

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler for the native kernels")

CONFIGS = {
    "gqa": dict(),
    "qkv-bias-mqa": dict(attention_bias=True, num_kv_heads=1),
    "sliding-window": dict(sliding_window=12),
    # widths that are not multiples of the kernels' 8-float vectors; 3 query heads per KV head
    "odd-shapes": dict(hidden_size=60, num_heads=3, num_kv_heads=1, intermediate_size=100),
}


def _model(**kw):
    model = spread_model(preset("tiny", vocab_size=256).replace(**kw))
    if kw.get("attention_bias"):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(std=0.5)  # zero biases would test nothing
    return model


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in (1, 5, 17, 30, 9, 40)]


def _run(llm: LLM, prompts: list[list[int]], tokens: int = 20) -> list[tuple[list[int], list[dict]]]:
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True, logprobs=3))
    return [(o.outputs[0].token_ids, [{t: lp.logprob for t, lp in d.items()} for d in o.outputs[0].logprobs])
            for o in outs]


class _Count:
    """Counts the layers computed natively (`calls`), and the whole-stack calls among them (`stacks`)."""

    def __init__(self, monkeypatch) -> None:
        self.calls = self.stacks = 0
        one, stack = native.DecodeLayerCall.__call__, native.DecodeLayerCall.stack

        def counted_one(*a, **k):
            self.calls += 1
            return one(*a, **k)

        def counted_stack(call, layers, *a, **k):
            self.calls += layers.n
            self.stacks += 1
            return stack(call, layers, *a, **k)

        monkeypatch.setattr(native.DecodeLayerCall, "__call__", counted_one)
        monkeypatch.setattr(native.DecodeLayerCall, "stack", counted_stack)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kv_dtype", ["auto", "float16"])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_outputs_are_bit_identical_with_and_without_the_fused_layer(config: str, kv_dtype: str, threads: int,
                                                                    monkeypatch) -> None:
    torch.set_num_threads(threads)
    model = _model(**CONFIGS[config])
    prompts = _prompts()
    count = _Count(monkeypatch)
    fused = _run(LLM(model, kv_cache_dtype=kv_dtype, max_num_seqs=4), prompts)
    # Every decode step ran its whole stack in one call (4 sequences at a time, 20 tokens each).
    assert count.stacks >= 19 and count.calls == 2 * count.stacks
    monkeypatch.setattr(DecodeBlock, "plan", lambda self: None)
    count.calls = 0
    plain = _run(LLM(model, kv_cache_dtype=kv_dtype, max_num_seqs=4), prompts)
    assert count.calls == 0
    assert fused == plain  # tokens and logprobs, exactly


def test_every_block_is_swapped_and_planned_once() -> None:
    llm = LLM(_model(), max_num_seqs=2)
    blocks = list(llm.engine.runner.model.model.layers)
    assert all(type(b) is DecodeBlock for b in blocks)
    _run(llm, _prompts()[:2], tokens=4)
    plans = [b._plan for b in blocks]
    assert all(p is not None for p in plans)
    _run(llm, _prompts()[:2], tokens=4)
    assert [b._plan for b in blocks] == plans  # still valid: not rebuilt


def test_moe_blocks_run_their_modules(monkeypatch) -> None:
    model = spread_model(preset("tiny-moe", vocab_size=256))
    count = _Count(monkeypatch)
    llm = LLM(model, max_num_seqs=2)
    _run(llm, _prompts()[:2], tokens=4)
    assert count.calls == 0
    assert all(b._plan is None for b in llm.engine.runner.model.model.layers)


def test_a_hook_a_new_weight_or_a_swapped_module_is_honoured(monkeypatch) -> None:
    model = _model()
    llm = LLM(model, max_num_seqs=2)
    prompts = _prompts()[:2]
    before = _run(llm, prompts, tokens=6)
    count = _Count(monkeypatch)
    layer = model.model.layers[0]

    seen = []
    handle = layer.mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    assert _run(llm, prompts, tokens=6) == before
    assert seen  # the hook ran: layer 0 went module by module
    # 5 decode steps: layer 0 never native, the others one call each (no whole-stack call)
    assert count.calls == 5 * len(model.model.layers) - 5 and count.stacks == 0
    handle.remove()

    # A new weight tensor (not an in-place change): the plan is rebuilt on the new address.
    old = layer.post_attention_layernorm.weight.data
    layer.post_attention_layernorm.weight.data = old * 3.0
    changed = _run(llm, prompts, tokens=6)
    assert changed != before
    ref = LLM(model, max_num_seqs=2)
    monkeypatch.setattr(DecodeBlock, "plan", lambda self: None)
    assert _run(ref, prompts, tokens=6) == changed  # what the modules compute with the new weight
    monkeypatch.undo()
    layer.post_attention_layernorm.weight.data = old

    # A swapped-in module (as LoRA or a quantizer would): the layer runs its modules.
    count = _Count(monkeypatch)
    calls = []

    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            calls.append(1)
            return self.inner(x)

    layer.self_attn.o_proj = Wrapped(layer.self_attn.o_proj)
    assert _run(llm, prompts, tokens=6) == before
    assert calls and count.calls == 5 * len(model.model.layers) - 5 and count.stacks == 0
    layer.self_attn.o_proj = layer.self_attn.o_proj.inner

    # A hook on a block: the stack gives way to the blocks' own calls, and the hook runs.
    count = _Count(monkeypatch)
    blocks_seen = []
    handle = layer.register_forward_pre_hook(lambda m, a: blocks_seen.append(1))
    assert _run(llm, prompts, tokens=6) == before
    assert blocks_seen and count.stacks == 0 and count.calls == 5 * len(model.model.layers)
    handle.remove()
    count = _Count(monkeypatch)
    assert _run(llm, prompts, tokens=6) == before
    assert count.stacks == 5


def test_plan_refuses_layers_the_kernel_cannot_compute() -> None:
    llm = LLM(_model(), max_num_seqs=2)
    block = llm.engine.runner.model.model.layers[0]
    assert LayerPlan.build(block) is not None
    block.self_attn.spec = dataclasses.replace(block.self_attn.spec, alibi=True)
    assert LayerPlan.build(block) is None


def test_the_step_call_checks_its_arguments() -> None:
    llm = LLM(_model(), max_num_seqs=2)
    plan = LayerPlan.build(llm.engine.runner.model.model.layers[0])
    pool = llm.engine.runner.kv_cache  # tiny: 4 heads of 16, 2 KV heads, 64 wide
    rows = torch.zeros(2, dtype=torch.int64)
    tables, lens = torch.zeros(1, 1, dtype=torch.int64), torch.ones(1, dtype=torch.int64)
    cos = torch.ones(1, 16)
    enough = torch.empty(native.scratch_size(4, tables, pool.shape[-2]))
    work = lambda n: torch.empty(n)  # noqa: E731
    with pytest.raises(ValueError, match="wrong shape, dtype, layout or size"):
        native.DecodeLayerCall(1, cos, cos, pool, rows, tables, lens, 4, torch.empty(1), work)
    with pytest.raises(ValueError, match="wrong shape, dtype, layout or size"):
        native.DecodeLayerCall(1, cos, cos.double(), pool, rows, tables, lens, 4, enough, work)
    call = native.DecodeLayerCall(1, cos, cos, pool, rows, tables, lens, 4, enough, work)
    with pytest.raises(ValueError, match="another shape"):
        call(plan.weights, torch.zeros(1, 2, 64), 0)
    assert call(plan.weights, torch.zeros(1, 1, 64), 0).shape == (1, 1, 64)
