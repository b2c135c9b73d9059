"""The engine's native CPU kernels (paged decode attention and KV writes, causal prefill attention,
few-row linear, fp32 and quantized, RMSNorm, RoPE, SwiGLU activation, greedy argmax), built on first use.

The C sources in ember/engine/kernels/ are compiled with the system C compiler ($CC, else cc)
into one shared library, cached under $EMBER_CACHE_DIR (default ~/.cache/ember)/kernels and
named by a hash of the sources, the flags, the compiler's version and this CPU's feature flags,
then loaded with ctypes (kernel_cache.py refuses a cache another user could write): no build
step at install time, no PyTorch headers. Where there is no compiler, or EMBER_NATIVE=0,
`available()` is False and the engine computes the same results with PyTorch alone
(attn_metadata.py's gather path, weight_layout.py's column-major weights).

The kernels compute in fp32 (the KV pool may also hold fp16 or bf16) and are for inference
only (no autograd). They run on torch's own OpenMP
threads (see _torch_openmp; a build without OpenMP runs them on one), and each wrapper below
falls back to PyTorch where its kernel does not apply.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch

from ember.engine.kernel_cache import cache_root, check_owned, compiler_version, private_dir
from ember.model.rope import rotate

log = logging.getLogger(__name__)

KERNELS = Path(__file__).with_name("kernels")
SOURCES = [KERNELS / name for name in ("paged_attention.c", "prefill_attention.c", "linear.c", "rmsnorm.c", "rope.c",
                                        "argmax.c", "swiglu.c", "quant_linear.c", "decode_layer.c")]
HEADERS = [KERNELS / "vexp.h", KERNELS / "kernels.h"]  # included by the sources: part of the cache key
# Reassociation lets the compiler vectorise the dot products' reductions. Not -ffast-math: a
# library linked with it sets flush-to-zero for the whole process when loaded (tests check).
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fno-signed-zeros",
         "-fassociative-math", "-ffp-contract=fast", "-fPIC"]
MAX_LINEAR_ROWS = 128  # kernels/linear.c beats BLAS up to ~160 rows (89 vs 78 GFLOP/s at 128); prefill stays with BLAS


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _torch_openmp() -> list[str]:
    """Linker arguments for the OpenMP runtime bundled with torch, or [] if it bundles none.

    The kernels' threads must come from torch's own pool: then torch.set_num_threads governs
    them too, and their threads are the ones torch's operators just used (already awake; a
    second runtime's threads would compete with torch's spinning ones for the same cores).
    """
    libdir = Path(torch.__file__).resolve().parent / "lib"
    found = sorted(libdir.glob("libgomp*.so*"))
    return [str(found[0]), f"-Wl,-rpath,{libdir}"] if found else []


def _compile(cc: str, out: str, openmp: list[str]) -> None:
    """Compile SOURCES into the shared library `out`, with OpenMP when `openmp` has link arguments."""
    with tempfile.TemporaryDirectory(dir=Path(out).parent) as tmp:
        objects = []
        for src in SOURCES:
            obj = str(Path(tmp) / f"{src.stem}.o")
            subprocess.run([cc, *FLAGS, *(["-fopenmp"] if openmp else []), "-c", str(src), "-o", obj],
                           check=True, capture_output=True, text=True, timeout=120)
            objects.append(obj)
        # Linked without -fopenmp, which would add the system's libgomp as a second runtime.
        subprocess.run([cc, "-shared", *objects, *openmp, "-o", out, "-lm"], check=True, capture_output=True,
                       text=True, timeout=120)


def cache_key(cc: str, openmp: list[str]) -> str:
    """The library's name in the cache: a hash of everything that shapes the machine code, so a
    changed source, flag, compiler or CPU never loads a library built for another."""
    parts = [s.read_bytes() for s in SOURCES + HEADERS] + [
        " ".join([cc, *FLAGS, *openmp]).encode(), compiler_version(cc).encode(), _cpu_flags().encode(),
        platform.machine().encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:32]


def _build(cc: str) -> Path:
    openmp = _torch_openmp()
    key = cache_key(cc, openmp)
    root = private_dir(cache_root() / "kernels")
    lib = root / f"ember_kernels-{key}.so"
    if lib.exists():
        check_owned(lib)
        return lib
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=root)
    os.close(fd)
    try:
        try:
            _compile(cc, tmp, openmp)
        except subprocess.CalledProcessError as e:
            if not openmp:
                raise
            log.info("building the native kernels with OpenMP failed (%s); building them single-threaded",
                     (e.stderr or "")[:200])
            _compile(cc, tmp, [])
        os.replace(tmp, lib)  # atomic: a concurrent process sees no library or a whole one
    finally:
        Path(tmp).unlink(missing_ok=True)
    return lib


class QuantProjection(ctypes.Structure):
    """A quantized projection for kernels/decode_layer.c (struct ember_qproj): its QUANT_FORMATS
    number, blocks, i8 row scales and bias (None: none)."""

    _fields_ = [("fmt", ctypes.c_int64), ("w", ctypes.c_void_p), ("rscale", ctypes.c_void_p),
                ("bias", ctypes.c_void_p)]


class LayerWeights(ctypes.Structure):
    """A decoder layer's weights (fp32, row-major contiguous; None: no bias) and shapes, as
    kernels/decode_layer.c's struct ember_layer; with quant=1, its projections q, k, v, o, gate,
    up, down are the quantized `proj` instead of the fp32 wqkv .. bdown. Holds addresses only:
    whoever builds one keeps the tensors alive and checks they are still the layer's
    (ember/engine/fused_layer.py)."""

    _fields_ = [(name, ctypes.c_void_p) for name in
                ("norm1", "wqkv", "bqkv", "wo", "bo", "norm2", "wgu", "bgu", "wdown", "bdown")] + \
               [(name, ctypes.c_int64) for name in ("D", "H", "Hkv", "hd", "I", "window")] + \
               [(name, ctypes.c_float) for name in ("eps1", "eps2", "scale")] + \
               [("quant", ctypes.c_int64), ("proj", QuantProjection * 7)]


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    if os.environ.get("EMBER_NATIVE", "1") == "0":
        return None
    cc = os.environ.get("CC", "cc")
    try:
        lib = ctypes.CDLL(str(_build(cc)))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or e
        log.warning("native CPU kernels unavailable (%s: %s); using PyTorch only", cc, str(detail)[:300])
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.ember_paged_decode.restype = None
    lib.ember_paged_decode.argtypes = [p] * 5 + [i64] * 6 + [ctypes.c_float, i64, p, i64, i64, p]
    lib.ember_kv_kinds.restype = ctypes.c_int
    lib.ember_max_threads.restype = ctypes.c_int
    lib.ember_kv_write.restype = None
    lib.ember_kv_write.argtypes = [p] * 3 + [i64] * 6
    lib.ember_prefill_attention_scratch.restype = i64
    lib.ember_prefill_attention_scratch.argtypes = [i64] * 4
    lib.ember_prefill_attention.restype = None
    lib.ember_prefill_attention.argtypes = [p, i64, i64] * 3 + [i64] * 7 + [ctypes.c_float, p, i64, p]
    lib.ember_linear.restype = None
    lib.ember_linear.argtypes = [p] * 4 + [i64] * 3 + [p]
    lib.ember_qlinear_scratch.restype = i64
    lib.ember_qlinear_scratch.argtypes = [i64] * 3
    lib.ember_qlinear.restype = None
    lib.ember_qlinear.argtypes = [i64] + [p] * 5 + [i64] * 3 + [p]
    lib.ember_qdequant.restype = None
    lib.ember_qdequant.argtypes = [i64, p, p, i64, i64, p]
    lib.ember_rms_norm.restype = None
    lib.ember_rms_norm.argtypes = [p] * 3 + [i64] * 2 + [ctypes.c_float]
    lib.ember_rope.restype = None
    lib.ember_rope.argtypes = [p] + [i64] * 5 + [p] * 3
    lib.ember_silu_mul.restype = None
    lib.ember_silu_mul.argtypes = [p, p, i64, i64, i64, p]
    lib.ember_argmax_rows.restype = None
    lib.ember_argmax_rows.argtypes = [p, i64, i64, p]
    layer = ctypes.POINTER(LayerWeights)
    lib.ember_decode_layer_work.restype = i64
    lib.ember_decode_layer_work.argtypes = [layer, i64]
    lib.ember_decode_layer.restype = None
    lib.ember_decode_layer.argtypes = [layer, p, p, i64, p, p, p, p, p, p, p, i64, i64, i64, p, i64, p]
    lib.ember_decode_layers.restype = None
    lib.ember_decode_layers.argtypes = [p, p, i64, p, ctypes.c_float, p, p, p, p, i64, p, p, p, i64, p, p, p, i64,
                                        i64, i64, p, i64, p]
    return lib


def available() -> bool:
    """Whether the kernels are built and loaded (builds them on the first call)."""
    return _library() is not None


# The pool's element kinds, as kernels/paged_attention.c numbers them.
KV_KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def supports(pool: torch.Tensor) -> bool:
    """Whether the paged decode kernel and kv_write can serve this KV pool (fp32, fp16 or bf16 on CPU)."""
    kind = KV_KINDS.get(pool.dtype)
    return kind is not None and pool.device.type == "cpu" and available() and bool(_kv_kinds() >> kind & 1)


@lru_cache(maxsize=1)
def _kv_kinds() -> int:
    """Bit 1 << kind for each pool element kind the kernels were built for (0: none, no kernels)."""
    lib = _library()
    return int(lib.ember_kv_kinds()) if lib is not None else 0


def threads() -> int:
    """Threads the kernels use: torch.get_num_threads() (the same OpenMP pool), or 1 for a
    library built without OpenMP."""
    lib = _library()
    return int(lib.ember_max_threads()) if lib is not None else 1


def scratch_size(num_heads: int, tables: torch.Tensor, block_size: int) -> int:
    """Values of the score buffer paged_decode needs: per thread, one sequence's scores for every query head."""
    return threads() * num_heads * tables.shape[1] * block_size


def kv_write(pool: torch.Tensor, src: torch.Tensor, rows: torch.Tensor) -> None:
    """pool.view(-1, D)[rows] = src.reshape(-1, D).to(pool.dtype) for src (N, Hkv, D), natively
    where it applies (an fp32 src on CPU, contiguous D, no autograd), else with index_copy_."""
    D = pool.shape[-1]
    if (src.dtype == torch.float32 and src.device.type == "cpu" and supports(pool)
            and src.dim() == 3 and src.stride(-1) == 1 and pool.is_contiguous() and rows.dtype == torch.int64
            and rows.is_contiguous() and rows.numel() == src.shape[0] * src.shape[1]
            and not (torch.is_grad_enabled() and src.requires_grad)):
        _library().ember_kv_write(pool.data_ptr(), src.data_ptr(), rows.data_ptr(), src.shape[0], src.shape[1], D,
                                  src.stride(0), src.stride(1), KV_KINDS[pool.dtype])
        return
    pool.view(-1, D).index_copy_(0, rows, src.reshape(-1, D).to(pool.dtype))


def paged_decode(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, tables: torch.Tensor,
                 lens: torch.Tensor, num_kv_heads: int, scale: float, window: int | None,
                 scratch: torch.Tensor) -> torch.Tensor:
    """Attention of q (B, H, D) over each sequence's blocks of a pool that `supports`
    (kernels/paged_attention.c has the layouts), computed in fp32; returns q's dtype.

    scratch: an fp32 buffer of at least scratch_size(...) values, reused between calls.
    """
    dtype = q.dtype
    q = q.to(torch.float32).contiguous()
    B, H, D = q.shape
    W = tables.shape[1]
    bs = k_pool.shape[-2]
    need = scratch_size(H, tables, bs)
    if scratch.dtype != torch.float32 or scratch.numel() < need:
        raise ValueError(f"paged_decode needs an fp32 scratch of {need} values")
    out = torch.empty_like(q)
    _library().ember_paged_decode(
        q.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(), tables.data_ptr(), lens.data_ptr(),
        B, W, H, num_kv_heads, D, bs, scale, window or 0, scratch.data_ptr(), need // (H * W * bs),
        KV_KINDS[k_pool.dtype], out.data_ptr())
    return out.to(dtype)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos0: int, scale: float,
                      window: int | None, buffer: Callable[[int], torch.Tensor],
                      out: torch.Tensor | None = None) -> torch.Tensor | None:
    """Causal attention of q (T, H, D) at positions pos0.. over k, v (S, Hkv, D) at positions
    0..S-1 (key j visible from query i iff j <= pos0 + i, and pos0 + i - j < window if one is
    given), through kernels/prefill_attention.c; returns a contiguous (T, H, D) (`out` if given,
    fp32 contiguous), or None where the kernel does not apply (fp32 on CPU, D a multiple of 8,
    last dimensions contiguous, no autograd), for the caller's SDPA.

    buffer(n): an fp32 scratch tensor of at least n values, reused between calls.
    """
    T, H, D = q.shape
    S, hkv = k.shape[0], k.shape[1]
    if not (T > 0 and S >= pos0 + T and D % 8 == 0 and H % hkv == 0 and k.shape == v.shape == (S, hkv, D)
            and all(t.dtype == torch.float32 and t.device.type == "cpu" and t.stride(-1) == 1 for t in (q, k, v))
            and (out is None or (out.shape == q.shape and out.dtype == torch.float32 and out.is_contiguous()))
            and not torch.is_grad_enabled() and available()):
        return None
    lib, n = _library(), threads()
    scratch = buffer(int(lib.ember_prefill_attention_scratch(S, hkv, D, n)))
    out = torch.empty(T, H, D, dtype=torch.float32) if out is None else out
    lib.ember_prefill_attention(q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), k.stride(0), k.stride(1),
                                v.data_ptr(), v.stride(0), v.stride(1), T, S, H, hkv, D, pos0, window or 0, scale,
                                scratch.data_ptr(), n, out.data_ptr())
    return out


def _applies(x: torch.Tensor, weight: torch.Tensor, rows: int, max_rows: int | None = None,
             check_weight: bool = True) -> bool:
    """Whether a kernel can take x and weight: 1..max_rows rows (any if None), fp32 on CPU, a
    contiguous weight (unless check_weight is False), no autograd, and the kernels built."""
    return (0 < rows and (max_rows is None or rows <= max_rows) and x.dtype == torch.float32
            and weight.dtype == torch.float32 and x.device.type == "cpu" and weight.device.type == "cpu"
            and (weight.is_contiguous() or not check_weight) and not torch.is_grad_enabled() and available())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through kernels/linear.c when it applies (up to MAX_LINEAR_ROWS fp32 rows, no autograd)."""
    out_features, in_features = weight.shape
    rows = x.numel() // in_features if in_features else 0
    if _applies(x, weight, rows, MAX_LINEAR_ROWS) and \
            (bias is None or (bias.is_contiguous() and bias.dtype == torch.float32)):
        x2 = x.reshape(rows, in_features).contiguous()
        y = torch.empty(rows, out_features, dtype=torch.float32)
        xt = None if rows == 1 else torch.empty(in_features * ((rows + 7) // 8 * 8), dtype=torch.float32)
        _library().ember_linear(x2.data_ptr(), weight.data_ptr(), 0 if bias is None else bias.data_ptr(),
                                y.data_ptr(), rows, out_features, in_features, 0 if xt is None else xt.data_ptr())
        return y.view(*x.shape[:-1], out_features)
    return torch.nn.functional.linear(x, weight, bias)


# kernels/quant_linear.c's weight formats: bytes per block of 32 weights (i8: per-row scale, no blocks).
QUANT_FORMATS = {"i8": 0, "q8_0": 1, "q4_0": 2, "q4_1": 3, "q4z": 4, "nf4": 5}
QUANT_BLOCK_BYTES = {"i8": 32, "q8_0": 34, "q4_0": 18, "q4_1": 20, "q4z": 20, "nf4": 20}


# Or-ed into a format's number: one-row products quantize x to int8 per block of 32 and use
# integer dot products (kernels/quant_linear.c), as llama.cpp does; nf4 ignores it.
INT8_ACTIVATIONS = 0x100


def quant_code(fmt: str, int8_activations: bool = False) -> int:
    """The number kernels/quant_linear.c takes for a format (and activation choice)."""
    return QUANT_FORMATS[fmt] | (INT8_ACTIVATIONS if int8_activations else 0)


def quant_linear(fmt: str, data: torch.Tensor, rscale: torch.Tensor | None, bias: torch.Tensor | None,
                 x: torch.Tensor, out_features: int, int8_activations: bool = False) -> torch.Tensor:
    """x (M, K) @ dequant(data)^T + bias through kernels/quant_linear.c, for 1..MAX_LINEAR_ROWS rows.

    int8_activations: a one-row x is quantized to int8 per block of 32 for integer dot products
    (x's rounding, at most half an 8-bit step of its block's range, is the only difference).

    The caller (ember/quant/native_layout.py) guarantees what the kernel reads: data uint8
    (out_features, row bytes of `fmt` at K) contiguous on CPU, rscale fp32 (out_features,) for
    "i8", bias fp32 contiguous or None, x fp32 (M, K) contiguous with K a multiple of 32 for the
    blocked formats, and the kernels available.
    """
    rows, K = x.shape
    lib = _library()
    scratch = torch.empty(int(lib.ember_qlinear_scratch(rows, K, threads())), dtype=torch.float32)
    y = torch.empty(rows, out_features, dtype=torch.float32)
    lib.ember_qlinear(quant_code(fmt, int8_activations), data.data_ptr(), 0 if rscale is None else rscale.data_ptr(),
                      0 if bias is None else bias.data_ptr(), x.data_ptr(), y.data_ptr(), rows, out_features, K,
                      scratch.data_ptr())
    return y


def quant_dequantize(fmt: str, data: torch.Tensor, rscale: torch.Tensor | None, K: int) -> torch.Tensor:
    """The fp32 (rows, K) weight that quant_linear multiplies with, for data (rows, row bytes) as
    quant_linear takes it (rows may be a contiguous slice of a weight, rscale its slice)."""
    out = torch.empty(data.shape[0], K, dtype=torch.float32)
    _library().ember_qdequant(QUANT_FORMATS[fmt], data.data_ptr(), 0 if rscale is None else rscale.data_ptr(),
                              data.shape[0], K, out.data_ptr())
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """F.rms_norm over the last dimension, natively for fp32 rows without autograd (4-5x faster
    than PyTorch's at 1-512 rows of 512: its rms_norm is several operators and temporaries)."""
    D = weight.shape[0]
    rows = x.numel() // D if D else 0
    if _applies(x, weight, rows) and x.is_contiguous():
        y = torch.empty_like(x)
        _library().ember_rms_norm(x.data_ptr(), weight.data_ptr(), y.data_ptr(), rows, D, eps)
        return y
    return torch.nn.functional.rms_norm(x, (D,), weight, eps)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """ember.model.rope.rotate (x * cos + x.roll(D // 2, -1) * sin) for x (B, T, H, D) and cos/sin
    (B, T, 1, D), in one pass through kernels/rope.c where it applies (fp32 on CPU, even D, no
    autograd, rows of x evenly strided, as the fused projection's views are); a contiguous result."""
    B, T, H, D = x.shape
    if (_applies(x, cos, B * T) and sin.dtype == torch.float32 and D % 2 == 0 and x.stride(-1) == 1
            and (B == 1 or x.stride(0) == T * x.stride(1)) and cos.shape == sin.shape == (B, T, 1, D)
            and cos.is_contiguous() and sin.is_contiguous()):
        out = torch.empty(B, T, H, D, dtype=torch.float32)
        _library().ember_rope(x.data_ptr(), B * T, H, D, x.stride(1), x.stride(2), cos.data_ptr(), sin.data_ptr(),
                              out.data_ptr())
        return out
    return rotate(x, cos, sin)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """F.silu(gate) * up, in one pass through kernels/swiglu.c where it applies (fp32 on CPU, no
    autograd, both (..., I) with rows evenly strided by the same step, as the two halves of the
    fused gate|up projection are); a contiguous result."""
    I = gate.shape[-1]
    rows = gate.numel() // I if I else 0
    if (gate.dim() >= 2 and gate.shape == up.shape and _applies(gate, up, rows, check_weight=False)
            and gate.stride(-1) == up.stride(-1) == 1):
        step = _row_stride(gate)
        if step is not None and step == _row_stride(up):
            out = torch.empty(gate.shape, dtype=torch.float32)
            _library().ember_silu_mul(gate.data_ptr(), up.data_ptr(), rows, I, step, out.data_ptr())
            return out
    return torch.nn.functional.silu(gate) * up


def _row_stride(x: torch.Tensor) -> int | None:
    """The step between consecutive rows of x (..., D) when its leading dimensions flatten into
    one evenly strided sequence of rows, else None."""
    step, span = x.stride(-2), x.shape[-2]
    for size, stride in zip(reversed(x.shape[:-2]), reversed(x.stride()[:-2])):
        if size != 1 and stride != step * span:
            return None
        span *= size
    return step


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(dim=-1) for a 2-D tensor, through kernels/argmax.c for contiguous fp32 on CPU
    (PyTorch's argmax reads ~10x slower than memory allows)."""
    R, V = x.shape
    # argmax has no gradient: autograd does not matter here, unlike in _applies.
    if R > 0 and V > 0 and x.dtype == torch.float32 and x.device.type == "cpu" and x.is_contiguous() and available():
        out = torch.empty(R, dtype=torch.int64)
        _library().ember_argmax_rows(x.data_ptr(), R, V, out.data_ptr())
        return out
    return x.argmax(dim=-1)


def decode_layer_work(weights: LayerWeights, rows: int) -> int:
    """fp32 values of the work buffer kernels/decode_layer.c needs for `rows` decode rows."""
    return int(_library().ember_decode_layer_work(ctypes.byref(weights), rows))


class LayerStack:
    """Consecutive layers for DecodeLayerCall.stack: their LayerWeights and pool layer indices
    as C arrays, built once and reused while the layers stay the same."""

    def __init__(self, weights: list[LayerWeights], layer_ids: list[int]) -> None:
        self.weights = weights  # alive while the array points at them
        self.array = (ctypes.c_void_p * len(weights))(*[ctypes.addressof(w) for w in weights])
        self.ids = (ctypes.c_int64 * len(layer_ids))(*layer_ids)
        self.n = len(weights)


class DecodeLayerCall:
    """kernels/decode_layer.c for one decode step: the arguments every layer shares (rows, RoPE
    cos/sin (rows, hd), the pool and its slots, block tables and lengths, as kv_write and
    paged_decode take them) are checked and converted once; each layer's call then passes only
    its weights, its input and its layer index. The caller checks that every kernel applies
    (ember/engine/fused_layer.py); the values are those of the kernels above, bit for bit.
    """

    def __init__(self, rows: int, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                 slot_rows: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor, num_heads: int,
                 scratch: torch.Tensor, work: Callable[[int], torch.Tensor]) -> None:
        hkv, bs, hd = kv_cache.shape[3:]
        if not (kv_cache.is_contiguous() and supports(kv_cache) and cos.numel() == sin.numel() == rows * hd
                and cos.dtype == sin.dtype == torch.float32 and cos.is_contiguous() and sin.is_contiguous()
                and slot_rows.dtype == tables.dtype == lens.dtype == torch.int64 and slot_rows.numel() == rows * hkv
                and tables.shape[0] == lens.numel() == rows and slot_rows.is_contiguous()
                and tables.is_contiguous() and lens.is_contiguous() and scratch.dtype == torch.float32
                and scratch.numel() >= scratch_size(num_heads, tables, bs)):
            raise ValueError("DecodeLayerCall: arguments of the wrong shape, dtype, layout or size")
        self.rows, self.shape, self.work = rows, (num_heads, hkv, hd), work
        self.keep = (cos, sin, kv_cache, slot_rows, tables, lens, scratch)  # alive while their addresses are used
        self.layer_bytes = kv_cache[0].numel() * kv_cache.element_size()
        self.pool = kv_cache.data_ptr()
        self.head = (cos.data_ptr(), sin.data_ptr())
        self.tail = [slot_rows.data_ptr(), tables.data_ptr(), lens.data_ptr(), tables.shape[1], bs,
                     KV_KINDS[kv_cache.dtype], scratch.data_ptr(), threads(), 0]
        self.needs: dict[int, int] = {}  # id(weights) -> work values checked for this step's rows
        self.fn = _library().ember_decode_layer
        self.stack_fn = _library().ember_decode_layers

    def _need(self, weights: LayerWeights, x: torch.Tensor) -> int:
        """Work values the layer needs, its shapes checked against the step's on first sight."""
        need = self.needs.get(id(weights))
        if need is None:
            if (weights.H, weights.Hkv, weights.hd) != self.shape or x.numel() != self.rows * weights.D:
                raise ValueError("DecodeLayerCall: a layer of another shape than the step was prepared for")
            need = self.needs[id(weights)] = decode_layer_work(weights, self.rows)
        return need

    def __call__(self, weights: LayerWeights, x: torch.Tensor, layer: int) -> torch.Tensor:
        """Layer `layer`'s output for x (1, rows, D) fp32 contiguous."""
        work = self.work(self._need(weights, x))  # held until the call returns
        tail = self.tail
        tail[-1] = work.data_ptr()
        out = torch.empty_like(x)
        k = self.pool + layer * self.layer_bytes  # this layer's keys, then its values
        self.fn(ctypes.byref(weights), x.data_ptr(), out.data_ptr(), self.rows, *self.head, k,
                k + self.layer_bytes // 2, *tail)
        return out

    def stack(self, layers: LayerStack, x: torch.Tensor, norm: torch.Tensor | None = None,
              eps: float = 0.0) -> torch.Tensor:
        """The output of `layers` applied in turn to x (1, rows, D) fp32 contiguous, then rms_norm
        with weight `norm` (D,) fp32 contiguous if given: the same values as calling each layer
        and rms_norm, in one native call."""
        need = max(self._need(w, x) for w in layers.weights)
        if norm is not None and (norm.dtype != torch.float32 or not norm.is_contiguous()
                                 or norm.numel() != x.shape[-1]):
            raise ValueError("DecodeLayerCall: the final norm's weight must be fp32, contiguous, one per feature")
        work = self.work(need)  # held until the call returns
        tail = self.tail
        tail[-1] = work.data_ptr()
        out, a, b = torch.empty_like(x), torch.empty_like(x), torch.empty_like(x)
        self.stack_fn(layers.array, layers.ids, layers.n, 0 if norm is None else norm.data_ptr(), eps, x.data_ptr(),
                      out.data_ptr(), a.data_ptr(), b.data_ptr(), self.rows, *self.head, self.pool, self.layer_bytes,
                      *tail)
        return out
