"""The native CPU kernels against PyTorch, the engine's fallback without them, and the decode relayout."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

import ember
from ember.adapters.lora import LoRAConfig, apply_lora
from ember.engine import LLM, SamplingParams, native
from ember.engine.attn_metadata import AttnMetadata, Workspace
from ember.engine.weight_layout import DecodeLinear, relayout_for_decode
from ember.model.attention import AttnSpec, position_bias, sdpa

needs_native = pytest.mark.skipif(not native.available(), reason="no C compiler: native kernels unavailable")


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch (and so the kernels, on torch's OpenMP pool) on n threads, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@needs_native
@pytest.mark.parametrize("rows", [1, 2, 3, 8, 9, 16, 17, 40, native.MAX_LINEAR_ROWS])
@pytest.mark.parametrize("shape", [(512, 512), (1536, 512), (97, 130), (7, 3), (13, 1408)])
def test_native_linear_matches_linear(rows: int, shape: tuple[int, int]) -> None:
    """Every tile shape of kernels/linear.c: row counts around its blocks of 8 and 16, output
    counts around its tiles of 6, input lengths off its 16-float prefetch steps."""
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(*shape, generator=g)
    b = torch.randn(shape[0], generator=g)
    x = torch.randn(1, rows, shape[1], generator=g)
    with torch.no_grad():
        for bias in (None, b):
            torch.testing.assert_close(native.linear(x, w, bias), F.linear(x, w, bias), rtol=1e-5, atol=2e-4)


@needs_native
@pytest.mark.parametrize("rows,dim", [(1, 512), (5, 37), (64, 512), (600, 512)])  # 600 x 512: split over threads
def test_native_rms_norm_matches_pytorch(rows: int, dim: int) -> None:
    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, dim, generator=g) * 3, torch.randn(dim, generator=g)
    for threads in (1, 2):
        with torch_threads(threads), torch.no_grad():
            torch.testing.assert_close(native.rms_norm(x, w, 1e-5), F.rms_norm(x, (dim,), w, 1e-5))


@needs_native
def test_kv_write_matches_index_copy_from_a_strided_view() -> None:
    """Keys as the fused q|k|v projection leaves them (a strided view) land in the right pool rows."""
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(5, 3, 4, 8, generator=g)  # (N, q|k|v, Hkv, D)
    k = qkv[:, 1]  # (N, Hkv, D), row stride 3 * Hkv * D
    rows = torch.randperm(40, generator=g)[:20]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        pool, expected = torch.zeros(10, 4, 1, 8, dtype=dtype), torch.zeros(10, 4, 1, 8, dtype=dtype)  # 40 rows of D
        native.kv_write(pool, k, rows)
        expected.view(-1, 8).index_copy_(0, rows, k.reshape(-1, 8).to(dtype))
        assert torch.equal(pool, expected), dtype


@needs_native
def test_kv_write_rounds_like_pytorch() -> None:
    """fp32 -> fp16 / bf16 in the pool is bit-identical to .to(): ties to even, overflow, NaN, subnormals."""
    specials = torch.tensor([0.0, -0.0, 1.0 + 2 ** -11, 1.0 + 3 * 2 ** -11, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8,
                             65504.0, 65520.0, 1e6, -1e6, 3e38, float("inf"), float("-inf"), float("nan"),
                             2 ** -24, 2 ** -25, 1e-30, 6e-8, -3.1415926, 1e-40])
    x = torch.cat([specials, torch.randn(4076) * 10.0 ** torch.randint(-8, 8, (4076,))]).view(-1, 1, 16)
    rows = torch.arange(x.shape[0])
    for dtype in (torch.float16, torch.bfloat16):
        pool = torch.zeros(x.shape[0], 1, 1, 16, dtype=dtype)
        if not native.supports(pool):
            continue
        native.kv_write(pool, x, rows)
        expected = x.to(dtype).view(torch.int16)
        got = pool.view(-1, 1, 16).view(torch.int16)
        nan = torch.isnan(x)
        assert torch.equal(got[~nan], expected[~nan]), dtype
        assert torch.isnan(pool.view(-1, 1, 16)[nan].float()).all()


@needs_native
@pytest.mark.parametrize("rows,heads,dim", [(1, 8, 64), (7, 2, 12), (600, 4, 64)])  # 600 rows: split over threads
def test_native_rope_matches_pytorch_on_strided_views(rows: int, heads: int, dim: int) -> None:
    """RoPE on the q and k views of a fused q|k|v output, as ember/model/rope.py computes it."""
    from ember.config import ModelConfig
    from ember.model.rope import apply_rope, rope_cos_sin

    cfg = ModelConfig(vocab_size=16, hidden_size=heads * dim, intermediate_size=8, num_layers=1,
                      num_heads=heads, num_kv_heads=heads)
    g = torch.Generator().manual_seed(rows)
    qkv = torch.randn(1, rows, 3, heads, dim, generator=g)
    q, k = qkv[:, :, 0], qkv[:, :, 1]  # (1, rows, H, D), rows strided by 3 * H * D
    positions = torch.randint(0, 4000, (1, rows), generator=g)
    cos, sin = rope_cos_sin(cfg, positions, torch.float32)
    expected = apply_rope(q, k, cos, sin)
    for threads in (1, 2):
        with torch_threads(threads), torch.no_grad():
            got = native.rope(q, cos, sin), native.rope(k, cos, sin)
        for a, b in zip(got, expected):
            assert a.is_contiguous()
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@needs_native
@pytest.mark.parametrize("rows,inter", [(1, 1408), (9, 13), (300, 1408)])  # 300 x 1408: split over threads
def test_native_silu_mul_matches_pytorch_on_fused_halves(rows: int, inter: int) -> None:
    """silu(gate) * up on the two halves of a fused gate|up output, as F.silu(gate) * up."""
    g = torch.Generator().manual_seed(rows)
    fused = torch.randn(1, rows, 2 * inter, generator=g) * 6  # gates far into both tails of the sigmoid
    fused[0, 0, :4] = torch.tensor([100.0, -100.0, 0.0, -0.0])
    gate, up = fused.split(inter, dim=-1)
    for threads in (1, 2):
        with torch_threads(threads), torch.no_grad():
            got = native.silu_mul(gate, up)
        assert got.is_contiguous()
        torch.testing.assert_close(got, F.silu(gate) * up)


@needs_native
def test_native_argmax_matches_pytorch() -> None:
    """First index of the maximum, ties and NaN as torch.argmax; rows shorter than a vector too."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(70, 32000, generator=g)
    x[3, 100] = x[3, 20000] = 50.0  # a tie: the first
    x[4, 7] = float("nan")  # NaN wins, as in PyTorch
    x[5, 31999] = float("inf")
    x[6] = 0.0
    x[6, 9] = -0.0
    x[7, 12] = x[7, 31990] = float("nan")
    for t in (x, x[:, :5], x[:1], x[:, :13]):  # grad mode on, as in the sampler: argmax has no gradient
        t = t.contiguous()
        assert torch.equal(native.argmax_rows(t), t.argmax(dim=-1))


def test_linear_falls_back_where_the_kernel_does_not_apply() -> None:
    w = torch.randn(8, 16, requires_grad=True)
    x = torch.randn(2, 16)
    y = native.linear(x, w)  # grad enabled: must stay differentiable
    y.sum().backward()
    assert w.grad is not None
    with torch.no_grad():
        many = torch.randn(native.MAX_LINEAR_ROWS + 1, 16)
        torch.testing.assert_close(native.linear(many, w.detach()), F.linear(many, w.detach()))  # BLAS
        wt = w.detach().t().contiguous().t()  # column-major: BLAS
        torch.testing.assert_close(native.linear(x, wt), F.linear(x, wt))


def _prefill_case(T: int, S: int, heads: int, hkv: int, d: int, seed: int = 0):
    """q (T, H, D) and k, v (S, Hkv, D) as the engine passes them: strided views into one fused
    projection per token (queries) and per key (keys, values)."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(S, heads + 2 * hkv, d, generator=g) * 2  # peaked softmaxes, large scores
    return qkv[S - T:, :heads], qkv[:, heads:heads + hkv], qkv[:, heads + hkv:]


def _prefill_reference(q, k, v, pos0: int, window: int | None) -> torch.Tensor:
    T, heads, d = q.shape
    spec = AttnSpec(layer_idx=0, num_heads=heads, num_kv_heads=k.shape[1], head_dim=d, scale=d ** -0.5,
                    sliding_window=window, alibi=False)
    bias = position_bias(spec, torch.arange(pos0, pos0 + T)[None], torch.arange(k.shape[0])[None], q.dtype)
    return sdpa(q[None], k[None], v[None], spec, bias, is_causal=False)[0]


@needs_native
@pytest.mark.parametrize("T,S,heads,hkv,d,window", [
    (1, 1, 1, 1, 8, None),  # one token
    (47, 47, 8, 8, 64, None), (48, 48, 8, 8, 64, None), (49, 49, 8, 8, 64, None),  # around a query block
    (300, 300, 8, 8, 64, None),  # keys past a block of 256 and an eight's tail
    (77, 200, 6, 2, 24, None),  # after 123 cached tokens, 3 query heads per KV head, D off 16
    (100, 1124, 4, 1, 64, None),  # a short chunk after a long cached prefix, one KV head
    (513, 513, 8, 8, 64, 100), (130, 260, 4, 4, 128, 37), (17, 40, 3, 1, 16, 5),  # sliding windows
])
def test_prefill_attention_matches_sdpa(T: int, S: int, heads: int, hkv: int, d: int, window: int | None) -> None:
    """kernels/prefill_attention.c against SDPA with the positional mask, in fp64 (fp32 SDPA is
    as far from it as the kernel: up to ~1e-5 on these cases): block and tile tails, GQA,
    chunks after cached keys, sliding windows narrower and wider than a block."""
    q, k, v = _prefill_case(T, S, heads, hkv, d, seed=T + S)
    pos0 = S - T
    with torch.no_grad():
        got = native.prefill_attention(q, k, v, pos0, d ** -0.5, window, lambda n: torch.empty(n))
        expected = _prefill_reference(q.double(), k.double(), v.double(), pos0, window)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=3e-5)
        out = torch.full((T, heads, d), float("nan"))
        assert native.prefill_attention(q, k, v, pos0, d ** -0.5, window, lambda n: torch.empty(n), out) is out
        assert torch.equal(out, got)


@needs_native
def test_prefill_attention_gives_the_same_bits_on_any_thread_count() -> None:
    q, k, v = _prefill_case(400, 400, 8, 2, 64)
    with torch.no_grad():
        results = []
        for n in (1, 2, 3):
            with torch_threads(n):
                results.append(native.prefill_attention(q, k, v, 0, 0.125, None, lambda m: torch.empty(m)))
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


def test_prefill_attention_declines_what_it_does_not_compute() -> None:
    """None (the caller's SDPA then attends) for head sizes off 8, other dtypes, autograd, a
    wrong `out`, or without the kernels."""
    q, k, v = _prefill_case(20, 20, 4, 2, 16)
    scratch = lambda n: torch.empty(n)  # noqa: E731
    with torch.no_grad():
        assert native.prefill_attention(q, k, v, 0, 0.25, None, scratch) is not None or not native.available()
        q12, k12, v12 = _prefill_case(20, 20, 4, 2, 12)
        assert native.prefill_attention(q12, k12, v12, 0, 0.25, None, scratch) is None
        assert native.prefill_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0, 0.25, None, scratch) is None
        assert native.prefill_attention(q, k, v, 0, 0.25, None, scratch, out=torch.empty(20, 4, 8)) is None
        assert native.prefill_attention(q, k[:10], v[:10], 0, 0.25, None, scratch) is None  # keys too few
    assert native.prefill_attention(q.requires_grad_(), k, v, 0, 0.25, None, scratch) is None


def _pool_case(seed: int, hkv: int, heads: int, window: int | None, dtype: torch.dtype = torch.float32,
               d: int = 16):
    """A random pool, 5 decode sequences of different lengths over scattered blocks, and a query each."""
    g = torch.Generator().manual_seed(seed)
    layers, num_blocks, bs = 2, 64, 4
    pool = torch.randn(layers, 2, num_blocks, hkv, bs, d, generator=g).to(dtype)
    lens = [1, 5, 12, 17, 30]
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, at = [], 0
    for n in lens:
        nb = (n + bs - 1) // bs
        tables.append(perm[at:at + nb])
        at += nb
    seqs = [(t, n - 1, 1) for t, n in zip(tables, lens)]  # each computes its last token now
    q = torch.randn(1, len(lens), heads, d, generator=g)
    k = torch.randn(1, len(lens), hkv, d, generator=g)
    v = torch.randn(1, len(lens), hkv, d, generator=g)
    spec = AttnSpec(layer_idx=1, num_heads=heads, num_kv_heads=hkv, head_dim=d, scale=d ** -0.5,
                    sliding_window=window, alibi=False)
    return pool, bs, seqs, q, k, v, spec, tables, lens


def _reference(pool, bs, q, k, v, spec, tables, lens) -> torch.Tensor:
    """Each query over its own keys, written out position by position: plain fp32 softmax
    attention over the values as the pool stores them."""
    kc, vc = pool[spec.layer_idx].float()
    rep = spec.num_heads // spec.num_kv_heads
    out = []
    for i, (table, n) in enumerate(zip(tables, lens)):
        keys = torch.stack([kc[table[p // bs], :, p % bs] for p in range(n)], dim=1)  # (Hkv, n, D)
        vals = torch.stack([vc[table[p // bs], :, p % bs] for p in range(n)], dim=1)
        # this step's token, written by attend (rounded to the pool's dtype)
        keys[:, n - 1], vals[:, n - 1] = k[0, i].to(pool.dtype).float(), v[0, i].to(pool.dtype).float()
        lo = max(0, n - spec.sliding_window) if spec.sliding_window else 0
        keys, vals = keys[:, lo:].repeat_interleave(rep, 0), vals[:, lo:].repeat_interleave(rep, 0)
        p = torch.softmax(torch.einsum("hd,hnd->hn", q[0, i], keys) * spec.scale, dim=-1)
        out.append(torch.einsum("hn,hnd->hd", p, vals))
    return torch.stack(out)[None]


@pytest.mark.parametrize("use_native", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hkv,heads,window,d", [(4, 4, None, 16), (2, 8, None, 16), (1, 4, None, 16),
                                                (2, 4, 6, 16), (2, 4, None, 12)])
def test_decode_attention_matches_reference(monkeypatch, use_native: bool, dtype: torch.dtype, hkv: int,
                                            heads: int, window: int | None, d: int) -> None:
    """Decode attention over fp32, fp16 and bf16 pools (kv_cache_dtype), natively and in PyTorch;
    d = 12 takes the kernel's paths for head sizes that are not a multiple of 8."""
    if use_native and not native.available():
        pytest.skip("no C compiler: native kernels unavailable")
    if not use_native:
        monkeypatch.setattr(native, "available", lambda: False)
    pool, bs, seqs, q, k, v, spec, tables, lens = _pool_case(hkv * 10 + heads, hkv, heads, window, dtype, d)
    if use_native and not native.supports(pool):
        pytest.skip(f"this CPU's build of the kernels has no {dtype} pools")
    expected = _reference(pool.clone(), bs, q, k, v, spec, tables, lens)
    meta = AttnMetadata.build(pool, bs, seqs, Workspace())
    assert (meta.native is not None) == use_native
    torch.testing.assert_close(meta.attend(q, k, v, spec), expected, rtol=1e-5, atol=1e-5)
    # this step's keys and values went into the pool, rounded as PyTorch rounds
    for i, (table, n) in enumerate(zip(tables, lens)):
        slot = pool[spec.layer_idx, :, table[(n - 1) // bs], :, (n - 1) % bs]  # (2, Hkv, D)
        assert torch.equal(slot, torch.stack([k[0, i], v[0, i]]).to(dtype))


@needs_native
def test_kernels_split_over_torchs_threads() -> None:
    """With two torch threads the kernels run on two (torch's OpenMP pool, where torch bundles
    one) and give the same results: sequences split between threads, each with its own scores."""
    with torch_threads(2):
        assert native.threads() == (2 if native._torch_openmp() else 1)
        for hkv, heads, window in [(4, 4, None), (2, 8, 6)]:
            pool, bs, seqs, q, k, v, spec, tables, lens = _pool_case(hkv + heads, hkv, heads, window)
            expected = _reference(pool.clone(), bs, q, k, v, spec, tables, lens)
            meta = AttnMetadata.build(pool, bs, seqs, Workspace())
            torch.testing.assert_close(meta.attend(q, k, v, spec), expected, rtol=1e-5, atol=1e-5)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for rows, shape in [(1, (4096, 512)), (16, (1536, 512)), (64, (1409, 1408))]:  # split by outputs
                w, x = torch.randn(*shape, generator=g), torch.randn(rows, shape[1], generator=g)
                torch.testing.assert_close(native.linear(x, w), F.linear(x, w), rtol=1e-5, atol=2e-4)


def test_engine_without_native_kernels_matches_naive(monkeypatch) -> None:
    """A fresh model served with PyTorch only (column-major layout, gather attention) is exact too."""
    monkeypatch.setattr(native, "available", lambda: False)
    torch.manual_seed(0)
    model = ember.Transformer(ember.preset("tiny").replace(num_kv_heads=2)).eval()
    for p in model.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.2)
    prompts = [[5 + i] * (3 + 7 * i) for i in range(6)]
    from ember.model.generate import generate

    expected = [generate(model, torch.tensor([p]), 12)[0, len(p):].tolist() for p in prompts]
    outs = LLM(model).generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert model.lm_head.weight.stride(0) == 1  # the wide head went column-major
    assert type(model.lm_head) is torch.nn.Linear


def test_relayout_keeps_values_and_yields_to_lora() -> None:
    torch.manual_seed(0)
    model = ember.Transformer(ember.preset("tiny")).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        before = model(ids)
    done = relayout_for_decode(model)
    assert relayout_for_decode(model) == done  # idempotent
    attn = model.model.layers[0].self_attn
    assert attn.fused_qkv is not None and attn.fused_qkv.valid((attn.q_proj, attn.k_proj, attn.v_proj))
    if done == "native":
        assert isinstance(model.lm_head, DecodeLinear)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(ids[:1, :1]), before[:1, :1], rtol=1e-5, atol=1e-5)  # one row: native path
    # Training after serving: gradients reach every projection's own Parameter.
    model(ids).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    model.zero_grad()
    # A LoRA swap replaces q_proj/v_proj: the fused q/k/v call must stop being used.
    apply_lora(model, LoRAConfig(r=4, alpha=8.0, targets=("q_proj", "v_proj")))
    assert not attn.fused_qkv.valid((attn.q_proj, attn.k_proj, attn.v_proj))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
        changed = model(ids)
    assert (changed - before).abs().max() > 1e-3  # the adapters take effect


@needs_native
def test_loading_the_kernels_keeps_subnormal_floats() -> None:
    """A library built with -ffast-math would switch on flush-to-zero for the whole process."""
    import ctypes

    tiny = torch.tensor(1e-40)  # subnormal in fp32
    assert tiny.item() != 0.0 and (tiny * 1.0).item() != 0.0
    assert ctypes.c_float(1e-40).value != 0.0
    assert (torch.tensor([1e-38]) / 1e3).item() != 0.0


def test_build_failure_falls_back(monkeypatch, tmp_path, caplog) -> None:
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path))
    native._library.cache_clear()
    try:
        with caplog.at_level("WARNING"):
            assert not native.available()
        assert "native CPU kernels unavailable" in caplog.text
    finally:
        monkeypatch.undo()
        native._library.cache_clear()


def test_a_build_without_openmp_gives_the_same_tokens(monkeypatch, tmp_path) -> None:
    """Where torch bundles no OpenMP runtime the kernels are built single-threaded; their
    team-shared loops (kernels/kernels.h) then run serially, with the same results."""
    from ember.config import preset
    from tests.engine.conftest import spread_model

    model = spread_model(preset("tiny", vocab_size=256))
    prompts = [[5, 9, 40, 7], [100, 3], list(range(20, 50))]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)

    def run() -> list:
        outs = LLM(model, max_num_seqs=3).generate(prompts, params)
        return [(o.outputs[0].token_ids, [{t: lp.logprob for t, lp in d.items()} for d in o.outputs[0].logprobs])
                for o in outs]

    with torch_threads(2):
        expected = run()
        monkeypatch.setattr(native, "_torch_openmp", lambda: [])
        monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path))
        native._library.cache_clear()
        native._kv_kinds.cache_clear()
        try:
            assert native.available() and native.threads() == 1
            assert run() == expected
        finally:
            monkeypatch.undo()
            native._library.cache_clear()
            native._kv_kinds.cache_clear()
    assert native.available()
