"""Quantization benchmark: batch-1 decode speed against fp32, and the quality table of every method.

    python bench/quant.py                                  # speed on a random quickstart-10m
    python bench/quant.py --preset bench-50m               # a larger, more memory-bound model
    python bench/quant.py --model runs/pt/model --quality  # + perplexity / size table, all methods

Speed: every variant decodes `--tokens` tokens greedily at batch 1 with `ember.generate` (the
naive decoder: row-major fp32 matmuls, not the engine's native kernels; bench/native_kernels.py times
INT8 against the engine's fp32 path), the variants interleaved for `--rounds` rounds in one
process (so machine load hits them alike); the median tokens/s of each is compared with fp32's.
Variants: fp32; INT8 through PyTorch's fused int8-weight CPU kernel (bf16 activations); INT8
dequantized on the fly to fp32; bf16 weights (a reference point: half the bytes, no integer
weights); NF4 and RTN 4-bit g128 (dequantized on the fly). RTN stands for every group method:
GPTQ and AWQ store the same packed 4-bit codes, scales and zeros in the same GroupQuantLinear, so
they decode at RTN's speed, and RTN needs no calibration text, which a random model has no
tokenizer for. Decode speed does not depend on the weights' values, so a random model measures it.

Quality (--quality, needs a trained model folder with its tokenizer): every method quantized
from the same fp32 model and scored on the held-out text (see `ember quantize`), each perplexity
and change with a bootstrap standard error over the scoring windows (changes paired with fp32's
windows). --eval-tokens asks for 100k tokens of held-out text: the bundled corpus's held-out
documents (~15k tokens) and then standard-library code past its code cap, which no model trained
on the bundled corpus has seen; --eval-data scores your own files instead.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ember  # noqa: E402
from ember.config import preset  # noqa: E402
from ember.model.transformer import Transformer  # noqa: E402
from ember.quant import QuantConfig, calibration_ids, quantize_model  # noqa: E402
from ember.quant.linear import Int8Linear  # noqa: E402
from ember.quant.report import decode_tokens_per_second, format_table, heldout_line, heldout_set, measure  # noqa: E402


class _DequantInt8(Int8Linear):
    """INT8 storage with the fused kernel disabled: dequantize to fp32, then F.linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.dequantize(x.dtype), self.bias)


def speed_variants(base: Transformer) -> dict[str, Transformer]:
    variants = {"fp32": base}
    int8 = quantize_model(copy.deepcopy(base), QuantConfig(method="int8"))
    variants["int8 (fused kernel)"] = int8
    slow = copy.deepcopy(int8)
    for name, m in list(slow.named_modules()):
        if isinstance(m, Int8Linear):
            d = _DequantInt8(m.in_features, m.out_features, m.bias is not None)
            d.weight, d.SCB, d.bias = m.weight, m.SCB, m.bias
            slow.set_submodule(name, d)
    variants["int8 (dequant fp32)"] = slow
    variants["bf16 weights"] = copy.deepcopy(base).to(torch.bfloat16)
    variants["nf4"] = quantize_model(copy.deepcopy(base), QuantConfig(method="nf4"))
    variants["rtn 4-bit g128"] = quantize_model(copy.deepcopy(base), QuantConfig(method="rtn", bits=4))
    return variants


def bench_speed(base: Transformer, tokens: int, rounds: int) -> None:
    variants = speed_variants(base)
    speeds: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, model in variants.items():
            speeds[name].append(decode_tokens_per_second(model, tokens, repeats=1))
    ref = statistics.median(speeds["fp32"])
    print(f"batch-1 decode, {tokens} tokens, median of {rounds} interleaved rounds "
          f"({torch.get_num_threads()} threads)")
    print(f"{'variant':<22} {'tok/s':>8} {'vs fp32':>8}   rounds")
    for name, vals in speeds.items():
        med = statistics.median(vals)
        print(f"{name:<22} {med:>8.1f} {med / ref:>7.2f}x   " + " ".join(f"{v:.0f}" for v in vals))


def bench_quality(model_dir: Path, eval_tokens: int, calib_samples: int, seq_len: int,
                  decode_tokens: int = 32, eval_data: list[str] | None = None,
                  only: list[str] | None = None) -> None:
    tok = ember.load_tokenizer(model_dir)
    base = ember.load_model(model_dir)
    eval_data = eval_data or ["bundled"]
    heldout = heldout_set(tok, eval_data, eval_tokens)
    if (note := heldout.note(eval_data)) is not None:
        print(note, flush=True)
    texts = heldout.texts
    calib = calibration_ids(tok, ["bundled"], calib_samples, seq_len)
    rows = [measure(base, tok, texts, "fp32", seq_len, decode_tokens=decode_tokens)]
    print(format_table(rows), flush=True)
    settings = [("int8", {}), ("nf4", {}), ("rtn-4b-g128", dict(method="rtn", bits=4)),
                ("gptq-4b-g128", dict(method="gptq", bits=4)), ("awq-4b-g128", dict(method="awq", bits=4)),
                ("rtn-3b-g128", dict(method="rtn", bits=3)), ("gptq-3b-g128", dict(method="gptq", bits=3)),
                ("awq-3b-g128", dict(method="awq", bits=3))]
    if only:
        unknown = sorted(set(only) - {label for label, _ in settings})
        if unknown:
            raise SystemExit(f"--methods: unknown {', '.join(unknown)}; choose from "
                             f"{', '.join(label for label, _ in settings)}")
        settings = [(label, kw) for label, kw in settings if label in only]
    for label, kw in settings:
        t0 = time.perf_counter()
        qcfg = QuantConfig(**(kw or {"method": label}))
        model = quantize_model(copy.deepcopy(base), qcfg, calib)
        spent = time.perf_counter() - t0
        rows.append(measure(model, tok, texts, label, seq_len, decode_tokens=decode_tokens, baseline=rows[0]))
        print(format_table(rows[-1:]).splitlines()[-1] + f"   (quantized in {spent:.0f}s)", flush=True)
    print(f"{heldout_line(rows)}; calibration: {calib_samples} x {seq_len} tokens")
    print(format_table(rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="trained model folder (default: a random --preset model)")
    p.add_argument("--preset", default="quickstart-10m")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quality", action="store_true", help="also the perplexity / size table (needs --model)")
    p.add_argument("--skip-speed", action="store_true", help="only the quality table")
    p.add_argument("--quality-decode-tokens", type=int, default=32, help="decode tokens timed per row (0: skip)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    p.add_argument("--eval-tokens", type=int, default=100_000,
                   help="held-out tokens to score (about; all of the held-out text if it holds fewer)")
    p.add_argument("--eval-data", nargs="+", default=["bundled"],
                   help="held-out text: 'bundled' (its held-out split) and/or files and folders")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--methods", nargs="+", default=None,
                   help="quality rows to run (default all): int8 nf4 rtn-4b-g128 gptq-4b-g128 awq-4b-g128 ...")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = ember.load_model(args.model) if args.model else Transformer(preset(args.preset)).eval()
    print(f"model: {args.model or args.preset}, {sum(p.numel() for p in base.parameters()) / 1e6:.1f}M parameters")
    if not args.skip_speed:
        bench_speed(base, args.tokens, args.rounds)
    if args.quality:
        if args.model is None:
            p.error("--quality needs --model (a trained model folder with its tokenizer)")
        bench_quality(args.model, args.eval_tokens, args.calib_samples, args.seq_len, args.quality_decode_tokens,
                      args.eval_data, args.methods)


if __name__ == "__main__":
    main()
