"""Multi-LoRA serving: many PEFT adapters (made by `peft` itself) over one base in the same batches.

The reference for each request is the engine serving that adapter alone, merged into the base
weights (LLM(base, adapter=...)); the multi-LoRA engine must give the same greedy tokens and
logprobs within 1e-5 in mixed batches, through slot eviction, and with the prefix cache on.
"""

from __future__ import annotations

import copy
import shutil

import pytest
import torch

import ember
from ember.engine import LLM, LoRARequest, LoRARequestError, RequestError, SamplingParams
from ember.engine.config import EngineConfigError
from tests.eval.conftest import tiny_dir, tokenizer  # noqa: F401

PROMPTS = ["The for statement", "A class definition", "Exceptions are raised", "def f(x):", "import os",
           "The while loop", "Comparisons can be chained", "A lambda expression"]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
TARGETS = [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
           ["o_proj", "down_proj"], ["gate_proj", "up_proj"]]


@pytest.fixture(scope="module")
def adapters(tiny_dir, tmp_path_factory):  # noqa: F811
    """16 random PEFT adapters of ranks 2-8 on different target sets, saved by peft."""
    peft = pytest.importorskip("peft")
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    root = tmp_path_factory.mktemp("adapters")
    paths = []
    for i in range(16):
        torch.manual_seed(100 + i)
        cfg = peft.LoraConfig(r=[2, 4, 8][i % 3], lora_alpha=[4, 16, 8][i % 3], target_modules=TARGETS[i % 4],
                              init_lora_weights=False, use_rslora=i % 5 == 4)
        model = peft.get_peft_model(copy.deepcopy(base), cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.3)  # large enough that every adapter changes the greedy tokens
        model.save_pretrained(root / f"a{i}")
        paths.append(root / f"a{i}")
    return paths


def lora(paths, i: int) -> LoRARequest:
    return LoRARequest(f"a{i}", i + 1, str(paths[i]))


def merged_alone(tiny_dir, path, prompts):  # noqa: F811
    return LLM(tiny_dir, adapter=path, num_kv_blocks=256).generate(prompts, GREEDY)


def assert_same(got, want, tol: float = 1e-5) -> None:
    for g, w in zip(got, want):
        go, wo = g.outputs[0], w.outputs[0]
        assert go.token_ids == wo.token_ids
        glp = [lp[t].logprob for lp, t in zip(go.logprobs, go.token_ids)]
        wlp = [lp[t].logprob for lp, t in zip(wo.logprobs, wo.token_ids)]
        assert max(abs(a - b) for a, b in zip(glp, wlp)) < tol


def test_a_batch_mixing_four_adapters_and_the_base_matches_each_adapter_alone(tiny_dir, adapters) -> None:  # noqa: F811
    llm = LLM(tiny_dir, enable_lora=True, max_loras=4, max_lora_rank=8, num_kv_blocks=256)
    prompts = PROMPTS + PROMPTS[:2]
    which = [0, 1, 2, 3, None, 1, 3, None, 0, 2]  # interleaved: no adapter's rows are contiguous
    outs = llm.generate(prompts, GREEDY, [None if w is None else lora(adapters, w) for w in which])
    base = LLM(tiny_dir, num_kv_blocks=256).generate(prompts, GREEDY)
    for k in (0, 1, 2, 3, None):
        idx = [i for i, w in enumerate(which) if w == k]
        want = [base[i] for i in idx] if k is None else merged_alone(tiny_dir, adapters[k], [prompts[i] for i in idx])
        assert_same([outs[i] for i in idx], want)
        if k is not None:  # the adapter really changes the output (a dropped adapter would not pass)
            assert any(outs[i].outputs[0].token_ids != base[i].outputs[0].token_ids for i in idx)
    assert llm.engine.lora.num_slot_loads == 4


def test_sixteen_adapters_cycle_through_four_slots(tiny_dir, adapters) -> None:  # noqa: F811
    llm = LLM(tiny_dir, enable_lora=True, max_loras=4, max_lora_rank=8, max_cpu_loras=4, num_kv_blocks=256)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(32)]
    which = [i % 16 for i in range(32)]
    for _ in range(2):  # the second round reads adapters evicted from host memory back from disk
        outs = llm.generate(prompts, GREEDY, [lora(adapters, w) for w in which])
    mgr = llm.engine.lora
    assert mgr.num_slot_loads >= 16 and mgr.num_disk_loads > 16
    for k in range(16):
        idx = [i for i, w in enumerate(which) if w == k]
        assert_same([outs[i] for i in idx], merged_alone(tiny_dir, adapters[k], [prompts[i] for i in idx]))


def test_prefix_cache_blocks_are_keyed_by_adapter(tiny_dir, adapters, tokenizer) -> None:  # noqa: F811
    llm = LLM(tiny_dir, enable_lora=True, max_loras=2, max_lora_rank=8, num_kv_blocks=256, block_size=4)
    prompt = tokenizer.encode("The for statement is used to iterate over the elements of a sequence")
    assert len(prompt) > 8
    first = llm.generate([prompt], GREEDY, lora(adapters, 1))[0]
    again = llm.generate([prompt], GREEDY, lora(adapters, 1))[0]
    other = llm.generate([prompt], GREEDY, lora(adapters, 2))[0]
    base = llm.generate([prompt], GREEDY)[0]
    assert first.num_cached_tokens == 0 and again.num_cached_tokens > 0  # the same adapter shares blocks
    assert other.num_cached_tokens == 0 and base.num_cached_tokens == 0  # another adapter, or none, does not
    assert_same([again], [first])
    assert_same([other], merged_alone(tiny_dir, adapters[2], [prompt]))
    assert_same([base], LLM(tiny_dir, num_kv_blocks=256).generate([prompt], GREEDY))


def test_adapters_over_a_quantized_base(tiny_dir, adapters, tmp_path) -> None:  # noqa: F811
    from ember.adapters.batched_lora import BatchedLoRALinear
    from ember.quant import QuantConfig, quantize_model
    from ember.quant.base import QuantLinear

    qdir = tmp_path / "int8"
    ember.save_model(quantize_model(ember.load_model(tiny_dir), QuantConfig(method="int8")), qdir)
    for f in tiny_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, qdir / f.name)
    llm = LLM(qdir, enable_lora=True, max_loras=2, max_lora_rank=8, num_kv_blocks=256)
    wrapped = [m for m in llm.engine.model.modules() if isinstance(m, BatchedLoRALinear)]
    assert wrapped and all(isinstance(m.base_layer, QuantLinear) for m in wrapped)
    which = [0, None, 1, 0]
    outs = llm.generate(PROMPTS[:4], GREEDY, [None if w is None else lora(adapters, w) for w in which])
    for k in (0, 1):
        idx = [i for i, w in enumerate(which) if w == k]
        # unmerged over the quantized base (QLoRA-style), one adapter per engine
        want = LLM(ember.load_model(qdir, adapter=adapters[k]), llm.get_tokenizer(), num_kv_blocks=256)
        assert_same([outs[i] for i in idx], want.generate([PROMPTS[i] for i in idx], GREEDY))


def test_lora_errors_name_the_problem(tiny_dir, adapters, tmp_path) -> None:  # noqa: F811
    with pytest.raises(RequestError, match="enable_lora"):
        LLM(tiny_dir, num_kv_blocks=64).generate(["x"], GREEDY, lora(adapters, 0))
    llm = LLM(tiny_dir, enable_lora=True, max_lora_rank=4, num_kv_blocks=64)
    with pytest.raises(LoRARequestError, match="rank 8 .* above max_lora_rank 4"):
        llm.generate(["x"], GREEDY, lora(adapters, 2))
    with pytest.raises(LoRARequestError, match="is not a folder"):
        llm.generate(["x"], GREEDY, LoRARequest("gone", 7, str(tmp_path / "missing")))
    llm.generate(["x"], GREEDY, lora(adapters, 0))
    with pytest.raises(LoRARequestError, match="already names adapter 'a0'"):
        llm.generate(["x"], GREEDY, LoRARequest("other", 1, str(adapters[1])))
    with pytest.raises(LoRARequestError, match="lora_int_id must be an int >= 1"):
        LoRARequest("x", 0, "p")
    with pytest.raises(EngineConfigError, match="max_cpu_loras"):
        LLM(tiny_dir, enable_lora=True, max_loras=4, max_cpu_loras=2)
    assert not llm.engine.has_unfinished()


def write_peft_adapter(folder, shapes: dict[str, tuple[int, int]], r: int, seed: int) -> None:
    """A PEFT-format adapter (the file layout peft writes) with random A and B for the named modules."""
    import json

    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (n_in, n_out) in shapes.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, n_in, generator=g) * 0.05
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(n_out, r, generator=g) * 0.05
    folder.mkdir()
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0,
        "target_modules": sorted({n.rsplit(".", 1)[1] for n in shapes}), "bias": "none"}))


def test_adapters_over_the_real_models_gguf_blocks(smollm2_file, tmp_path) -> None:
    """SmolLM2's Q4_1 blocks kept as they are (GGUFLinear): two adapters and the base in one batch equal
    each adapter alone, unmerged over the same blocks (ember.load_model(..., adapter=...))."""
    from ember.adapters.batched_lora import BatchedLoRALinear
    from ember.quant.gguf_linear import GGUFLinear

    tok = ember.load_tokenizer(smollm2_file)
    paths = []
    for i, (mods, r) in enumerate([(("q_proj", "v_proj"), 8), (("o_proj", "down_proj", "up_proj"), 4)]):
        dims = {"q_proj": (576, 576), "v_proj": (576, 192), "o_proj": (576, 576), "down_proj": (1536, 576),
                "up_proj": (576, 1536)}
        part = {"q_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn"}
        shapes = {f"model.layers.{layer}.{part.get(m, 'mlp')}.{m}": dims[m] for layer in range(30) for m in mods}
        write_peft_adapter(tmp_path / f"s{i}", shapes, r, seed=i)
        paths.append(tmp_path / f"s{i}")
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
               for q in ("What is the capital of France?", "Name a colour.", "What is 2 + 2?")]
    llm = LLM(smollm2_file, enable_lora=True, max_loras=2, max_lora_rank=8, kv_cache_memory=0.1)
    assert any(isinstance(m.base_layer, GGUFLinear) for m in llm.engine.model.modules()
               if isinstance(m, BatchedLoRALinear))
    loras = [LoRARequest("s0", 1, str(paths[0])), None, LoRARequest("s1", 2, str(paths[1]))]
    outs = llm.generate(prompts, GREEDY, loras)
    # The references run the same three prompts together. Over 30 layers fp32 rounding alone moves
    # logprobs by ~1e-5: one adapter's engine gives 0.6e-5 apart for a prompt alone or in a batch of
    # three, and the low-rank products here run over 1 row where the reference's run over 3 (measured
    # 0.8e-5 and 1.4e-5 for the two adapters), so the tolerance is 5e-5; the base row is bit-exact.
    for i, path in ((0, paths[0]), (2, paths[1])):
        alone = LLM(ember.load_model(smollm2_file, keep_quantized=True, adapter=path), tok, kv_cache_memory=0.1)
        assert_same([outs[i]], alone.generate(prompts, GREEDY)[i:i + 1], tol=5e-5)
    assert_same([outs[1]], LLM(smollm2_file, kv_cache_memory=0.1).generate(prompts, GREEDY)[1:2], tol=1e-12)


def test_adapters_with_speculative_decoding_keep_their_greedy_tokens(tiny_dir, adapters) -> None:  # noqa: F811
    """Prompt-lookup drafts are verified with each request's adapter: the same tokens as without them."""
    prompts = ["The for statement for statement for statement", "import os import os import"] * 2
    which = [lora(adapters, 0), None, lora(adapters, 1), lora(adapters, 0)]
    plain = LLM(tiny_dir, enable_lora=True, max_loras=2, max_lora_rank=8, num_kv_blocks=256)
    spec = LLM(tiny_dir, enable_lora=True, max_loras=2, max_lora_rank=8, num_kv_blocks=256,
               speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)  # long enough to fall into loops
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, params, which)]
    assert [o.outputs[0].token_ids for o in spec.generate(prompts, params, which)] == want
    stats = spec.engine.stats()
    assert stats.spec_decode_num_draft_tokens > 0 and stats.spec_decode_num_accepted_tokens > 0
