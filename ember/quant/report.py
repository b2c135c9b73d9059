"""What a quantized model costs and keeps: size, bits per weight, held-out perplexity, decode speed.

One row per model, the same measurements for the unquantized baseline and every method, so
`ember quantize`, the quickstart stage and `bench/quant.py` print comparable tables:

    row = measure(model, tok, texts, label="gptq", baseline=base_row)
    print(format_table([base_row, row]))

  bits/w      bits per weight of the quantized layers (codes + scales + zeros + indices)
  MB          every weight the model holds (embedding and norms included)
  x layers    fp32 bytes of the quantized layers / their bytes now
  x model     fp32 bytes of the whole model / its bytes now
  ppl         token perplexity on held-out text (ember.eval.perplexity, rolling windows)
  tok/s       batch-1 greedy decode with ember.generate (best of `repeats`)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from ember.eval.perplexity import model_perplexity
from ember.model.generate import generate
from ember.quant.calibration import split_documents
from ember.quant.linear import QUANT_LINEARS, quantizable_linears, weight_bytes


@dataclass
class QuantRow:
    label: str
    bits_per_weight: float
    weight_mb: float
    layer_ratio: float  # fp32 size / size, over the layers that are (or would be) quantized
    model_ratio: float  # fp32 size / size, whole model
    perplexity: float
    tokens_per_s: float
    delta_pct: float | None = None  # perplexity change versus the baseline, percent


def layer_footprint(model: nn.Module) -> tuple[int, int]:
    """(weights, bytes) of the quantized layers, or of the quantizable ones in a float model."""
    quant = [m for m in model.modules() if isinstance(m, QUANT_LINEARS)]
    if not quant:
        linears = quantizable_linears(model).values()
        return (sum(m.weight.numel() for m in linears),
                sum(m.weight.numel() * m.weight.element_size() for m in linears))
    params = sum(m.in_features * m.out_features for m in quant)
    nbytes = sum(t.numel() * t.element_size() for m in quant for n, t in m.state_dict().items()
                 if n != "bias" and not n.endswith((".quant_map", ".nested_quant_map", "quant_state.bitsandbytes__nf4")))
    return params, nbytes


def fp32_bytes(model: nn.Module) -> int:
    """What the model's weights would take in fp32 (a quantized layer counts in_features * out_features)."""
    total, seen = 0, set()
    for module in model.modules():
        if isinstance(module, QUANT_LINEARS):
            total += 4 * module.in_features * module.out_features + (4 * module.out_features if module.bias is not None else 0)
            continue
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += 4 * p.numel()
    return total


def heldout_texts(tokenizer, data: list[str], max_tokens: int) -> list[str]:
    """Held-out documents (bundled: the pretraining split's validation documents) up to max_tokens."""
    texts, count = [], 0
    for doc in split_documents(data, held_out=True):
        texts.append(doc.text)
        count += len(tokenizer.encode(doc.text, add_special_tokens=False))
        if count >= max_tokens:
            break
    return texts


@torch.no_grad()
def decode_tokens_per_second(model: nn.Module, new_tokens: int = 64, prompt_len: int = 16,
                             repeats: int = 3) -> float:
    """Batch-1 greedy decode speed (tokens/s) with the naive generate, best of `repeats`."""
    vocab = model.config.vocab_size
    prompt = torch.arange(prompt_len).remainder(vocab).unsqueeze(0)
    generate(model, prompt, 4)  # warm-up: allocations, kernel selection
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        generate(model, prompt, new_tokens)
        best = min(best, time.perf_counter() - t0)
    return new_tokens / best


def measure(model: nn.Module, tokenizer, texts: list[str], label: str, max_len: int = 512,
            decode_tokens: int = 64, baseline: QuantRow | None = None) -> QuantRow:
    params, nbytes = layer_footprint(model)
    total = weight_bytes(model)
    ppl = model_perplexity(model, tokenizer, texts, max_len=max_len).token_perplexity
    speed = decode_tokens_per_second(model, decode_tokens) if decode_tokens > 0 else float("nan")
    row = QuantRow(label, 8 * nbytes / max(params, 1), total / 1e6, 4 * params / max(nbytes, 1),
                   fp32_bytes(model) / total, ppl, speed)
    if baseline is not None:
        row.delta_pct = 100.0 * (ppl / baseline.perplexity - 1.0)
    return row


def format_table(rows: list[QuantRow]) -> str:
    head = f"{'method':<14} {'bits/w':>7} {'MB':>8} {'x layers':>9} {'x model':>8} {'ppl':>9} {'Δppl':>8} {'tok/s':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        delta = "" if r.delta_pct is None else f"{r.delta_pct:+.2f}%"
        speed = "-" if math.isnan(r.tokens_per_s) else f"{r.tokens_per_s:.1f}"  # decode not timed
        lines.append(f"{r.label:<14} {r.bits_per_weight:>7.2f} {r.weight_mb:>8.2f} {r.layer_ratio:>8.2f}x "
                     f"{r.model_ratio:>7.2f}x {r.perplexity:>9.3f} {delta:>8} {speed:>8}")
    return "\n".join(lines)
