"""ember's engine against llama.cpp on the same GGUF files: batch-1 decode, pp512 prefill, and
ember's throughput at 64 concurrent requests, quantized against fp32.

    python bench/decode_vs_llamacpp.py                        # SmolLM2-135M, 2 threads, 3 rounds
    python bench/decode_vs_llamacpp.py --threads 1 --rounds 5 --llama-bench PATH

Like with like:
  * one set of weights: the model (default the installed SmolLM2-135M-Instruct, Q4_1) is read
    dequantized and written by `ember export` as f32, q8_0 and q4_0 GGUFs (every 2-D tensor in
    that type, the tied embedding/head included). Both sides run each of these files: llama.cpp
    through `llama-bench`, ember through `LLM(file)`, which keeps the Q8_0/Q4_0 blocks as stored
    (no requantization) and runs them on its native kernels (fp32 activations, weights
    dequantized in registers); the f32 file runs on ember's fp32 kernels.
  * the same threads (torch.set_num_threads / llama-bench -t), rounds interleaved in one process
    (ember, llama.cpp, ember, ... per file), medians compared. llama-bench is a subprocess; its
    own warm-up run is kept.
  * decode: llama-bench tg128 (128 tokens generated from an empty context) against ember's engine
    generating 128 tokens after a one-token prompt (only the decode steps timed); prefill:
    llama-bench pp512 against ember's engine prefilling a 512-token prompt in one step.
  * differences that remain, printed with the table: ember's KV cache is fp32 (lossless),
    llama.cpp's default f16; llama.cpp quantizes activations to 8 bits for its integer dot
    products, ember keeps them fp32 unless asked; ember's kernels are built with -march=native and
    its prefill uses PyTorch's BLAS, so where llama-bench was built for another CPU (e.g. AVX2
    only on an AVX-512 machine) the comparison favours ember: check how llama.cpp was built; ember's step includes its scheduler and sampler (Python).
  * the Q8_0 / Q4_0 files once more with ember's int8 activations at batch 1 (EngineConfig
    int8_activations: llama.cpp's arithmetic, x rounded to 8 bits per block of 32), labelled;
  * ember's own formats too: `ember quantize --method int8` and RTN 4-bit g32, each with
    `--quantize-head` (Q8_0 embedding and head), beside llama.cpp's Q8_0 / Q4_0 file;
  * the roofline: bytes a decode step must read (every weight once, the KV cache aside) over the
    read bandwidth measured each round with the same threads (an fp32 matrix-vector product over
    512 MB, BLAS's or ember's, the faster): the tokens/s no implementation can pass.
Throughput: 64 requests (32-token prompts, 64 tokens each, all submitted at once) through ember's
engine on each file, tokens generated per second, interleaved rounds.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ember  # noqa: E402
from ember.engine import LLM, SamplingParams, native  # noqa: E402
from ember.quant.gguf import export_gguf  # noqa: E402
from ember.quant import QuantConfig, quantize_model  # noqa: E402
from ember.quant.base import QuantLinear  # noqa: E402

TYPES = ("f32", "q8_0", "q4_0")
# ember's own quantized formats (`ember quantize ... --quantize-head`), each set beside the
# llama.cpp file of its bit width
# ... and the same files with int8 activations (llama.cpp's arithmetic; EngineConfig.int8_activations)
OWN = {"q8_0+i8a": "q8_0", "q4_0+i8a": "q4_0", "int8": "q8_0", "rtn4": "q4_0"}
LABEL = {"f32": "fp32 / f32", "q8_0": "Q8_0 blocks / Q8_0", "q4_0": "Q4_0 blocks / Q4_0",
         "q8_0+i8a": "Q8_0, int8 act. / Q8_0", "q4_0+i8a": "Q4_0, int8 act. / Q4_0",
         "int8": "int8+q8 head / Q8_0", "rtn4": "rtn4 g32+q8 head / Q4_0"}


def find_llama_bench(given: Path | None) -> Path | None:
    if given is not None:
        return given
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "shared" / "tools" / "llama.cpp" / "llama-bench"
        if candidate.is_file():
            return candidate
    return None


def llama_bench(binary: Path, gguf: Path, threads: int, prompt: int, gen: int) -> float:
    """tokens/s of one llama-bench test (-r 1, its warm-up included)."""
    cmd = [str(binary), "-m", str(gguf), "-t", str(threads), "-p", str(prompt), "-n", str(gen), "-r", "1",
           "-o", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "LD_LIBRARY_PATH": str(binary.parent)})
    if out.returncode != 0:
        raise RuntimeError(f"llama-bench failed: {out.stderr.strip().splitlines()[-1:]}")
    return float(json.loads(out.stdout)[0]["avg_ts"])


def ember_decode(llm: LLM, tokens: int) -> float:
    """tokens/s of batch-1 greedy decode: one-token prompt, `tokens` decode steps timed."""
    engine = llm.engine
    engine.add_request("tg", [1], SamplingParams(temperature=0, max_tokens=tokens + 1, ignore_eos=True))
    with torch.inference_mode():
        engine.step()  # the prefill of the one prompt token and the first sampled token
        start, steps = time.perf_counter(), 0
        while engine.has_unfinished():
            engine.step()
            steps += 1
    return steps / (time.perf_counter() - start)


def ember_prefill(llm: LLM, tokens: int, vocab: int, seed: int) -> float:
    """tokens/s of prefilling one fresh `tokens`-token prompt (a new seed each call, and the
    engines run without prefix caching: nothing is reused) in one engine step."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, vocab, (tokens,), generator=g).tolist()
    engine = llm.engine
    engine.add_request("pp", prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    with torch.inference_mode():
        start = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
    return tokens / (time.perf_counter() - start)


def ember_throughput(llm: LLM, requests: int, prompt_len: int, out_len: int, vocab: int, seed: int) -> float:
    """Generated tokens/s of `requests` concurrent requests (fresh random prompts each call)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (prompt_len,), generator=g).tolist() for _ in range(requests)]
    start = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True))
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    return n / (time.perf_counter() - start)


def weight_bytes_streamed_and_held(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes a decode step reads: every linear's weight, dense or as its kernel's packed copy,
    the head included, the embedding's one row and the norms left out; bytes held in memory:
    every parameter and buffer plus packed copies that are not the stored tensors themselves)."""
    streamed, held, seen = 0, 0, set()

    def hold(t: torch.Tensor) -> int:
        nonlocal held
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key in seen:
            return 0
        seen.add(key)
        held += key[1]
        return key[1]

    for t in list(model.parameters()) + list(model.buffers()):
        hold(t)
    for module in model.modules():
        if isinstance(module, QuantLinear):
            packed = module.packed_weight()
            tensors = [packed.data] + ([packed.rscale] if packed.rscale is not None else []) if packed else \
                [module.dequantize()]
            for t in tensors:
                hold(t)
            streamed += sum(t.numel() * t.element_size() for t in tensors)
        elif isinstance(module, torch.nn.Linear):
            streamed += module.weight.numel() * module.weight.element_size()
    return streamed, held


def read_bandwidth(matrix: torch.Tensor) -> float:
    """GB/s at which an fp32 matrix-vector product streams `matrix` (512 MB, beyond every cache):
    the better of BLAS's (torch.mv) and ember's native kernel, best of 3 each."""
    v = torch.ones(matrix.shape[1])
    best = float("inf")
    for fn in (lambda: torch.mv(matrix, v), lambda: native.linear(v.view(1, -1), matrix, None)):
        for _ in range(3):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
    return matrix.numel() * 4 / best / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="model folder, GGUF or known name")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tg", type=int, default=128, help="decode tokens")
    p.add_argument("--pp", type=int, default=512, help="prompt tokens of the prefill test")
    p.add_argument("--requests", type=int, default=64, help="concurrent requests of the throughput test (0: skip)")
    p.add_argument("--llama-bench", type=Path, default=None, help="llama-bench binary (default: ../shared/tools)")
    p.add_argument("--work-dir", type=Path, default=None, help="where the GGUFs are written (default: a temp dir)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    binary = find_llama_bench(args.llama_bench)
    if binary is None:
        print("llama-bench not found (pass --llama-bench): ember's side only")

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="ember-vs-llamacpp-"))
    work.mkdir(parents=True, exist_ok=True)
    dense = ember.load_model(args.model)
    tok = ember.load_tokenizer(args.model)
    files = {}
    for kind in TYPES:
        files[kind] = work / f"model-{kind}.gguf"
        if not files[kind].exists():
            export_gguf(dense, tok, files[kind], kind)
    vocab = dense.config.vocab_size
    own = {"int8": QuantConfig(method="int8", quantize_head=True),
           "rtn4": QuantConfig(method="rtn", bits=4, group_size=32, quantize_head=True)}
    models = {kind: quantize_model(copy.deepcopy(dense), qcfg) for kind, qcfg in own.items()}
    del dense

    # One engine per model, kept for the whole run (loading is not what is timed).
    engine_cfg = dict(max_num_seqs=max(args.requests, 1), kv_cache_memory=1.0, enable_prefix_caching=False,
                      max_num_batched_tokens=max(args.pp, 2048))
    llms = {k: LLM(f, **engine_cfg) for k, f in files.items()}
    llms.update({f"{k}+i8a": LLM(files[k], int8_activations=True, **engine_cfg) for k in ("q8_0", "q4_0")})
    llms.update({k: LLM(m, tok, **engine_cfg) for k, m in models.items()})
    kinds = TYPES + ("q8_0+i8a", "q4_0+i8a", "int8", "rtn4")
    nbytes, held = {}, {}
    for k, llm in llms.items():
        nbytes[k], held[k] = weight_bytes_streamed_and_held(llm.engine.runner.model)
    matrix = torch.ones(16384, 8192)
    for llm in llms.values():  # warm-up: kernels compiled and weights packed, first allocations made
        ember_decode(llm, args.tg)
        ember_prefill(llm, args.pp, vocab, seed=10_000)

    res: dict[tuple[str, str, str], list[float]] = {}
    bandwidths = []
    for r in range(args.rounds):
        bandwidths.append(read_bandwidth(matrix))
        for kind in kinds:
            for side in ("ember", "llama.cpp"):
                if side == "llama.cpp" and (binary is None or kind in OWN):
                    continue
                if side == "ember":
                    tg, pp = ember_decode(llms[kind], args.tg), ember_prefill(llms[kind], args.pp, vocab, seed=r)
                else:
                    tg = llama_bench(binary, files[kind], args.threads, 0, args.tg)
                    pp = llama_bench(binary, files[kind], args.threads, args.pp, 0)
                res.setdefault((kind, side, "tg"), []).append(tg)
                res.setdefault((kind, side, "pp"), []).append(pp)
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    med = {k: statistics.median(v) for k, v in res.items()}
    bandwidth = statistics.median(bandwidths)
    print(f"\n{args.model}: batch-1 decode (tg{args.tg}) and prefill (pp{args.pp}); {args.threads} threads, "
          f"medians of {args.rounds} interleaved rounds; read bandwidth {bandwidth:.1f} GB/s")
    print(f"{'weights (ember / llama.cpp)':30} {'RAM MB':>6} {'read MB':>7} {'roofline':>9} {'ember tg':>9} {'llama tg':>9} "
          f"{'ratio':>6} {'ember pp':>9} {'llama pp':>9} {'ratio':>6}")
    for kind in kinds:
        roof = bandwidth * 1e9 / nbytes[kind]
        et, ep = med[(kind, "ember", "tg")], med[(kind, "ember", "pp")]
        other = OWN.get(kind, kind)
        lt, lp = med.get((other, "llama.cpp", "tg")), med.get((other, "llama.cpp", "pp"))
        print(f"{LABEL[kind]:30} {held[kind] / 1e6:6.1f} {nbytes[kind] / 1e6:7.1f} {roof:9.1f} {et:9.1f} "
              f"{lt or float('nan'):9.1f} {et / lt if lt else float('nan'):5.2f}x "
              f"{ep:9.1f} {lp or float('nan'):9.1f} {ep / lp if lp else float('nan'):5.2f}x")
    print("GGUF files: " + ", ".join(f"{k} {files[k].stat().st_size / 1e6:.1f} MB" for k in TYPES))
    print("tokens/s; RAM MB: ember's weights in memory (packed kernel copies included); read MB: weight bytes a "
          "decode step streams; roofline = read bandwidth / read MB (the KV cache aside). ember: fp32 "
          "activations, weights dequantized in registers, fp32 KV cache, Python scheduler+sampler per step; "
          "llama.cpp: activations quantized to 8 bits for integer dot products, f16 KV cache. 'int8 act.': "
          "the same files with ember's int8 activations at batch 1 (llama.cpp's arithmetic; prefill stays fp32). "
          "The last two rows are ember's own formats (quantized in this process from the same weights, so not "
          "the file's values) beside llama.cpp's row of the same bit width.")

    if args.requests:
        thr: dict[str, list[float]] = {}
        for r in range(args.rounds):
            for kind in kinds:
                thr.setdefault(kind, []).append(ember_throughput(llms[kind], args.requests, 32, 64, vocab, seed=r))
        base = statistics.median(thr["f32"])
        print(f"\nember engine, {args.requests} concurrent requests (32-token prompts, 64 tokens each), "
              f"generated tokens/s, medians of {args.rounds} interleaved rounds:")
        for kind in kinds:
            m = statistics.median(thr[kind])
            print(f"  {LABEL[kind].split(' / ')[0]:24} {m:8.1f}   {m / base:5.2f}x fp32")


if __name__ == "__main__":
    main()
