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
  ±           bootstrap standard error over the scoring windows (windows resampled; for Δppl the
              per-window differences from the baseline, paired). Windows of one document are
              not independent, so with few documents the SE is optimistic.
  tok/s       batch-1 greedy decode with ember.generate (best of `repeats`)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ember.eval.loglikelihood import prefix_token_id, score_spans
from ember.eval.perplexity import PerplexityResult, rolling_spans
from ember.eval.stats import perplexity_delta_stderr, perplexity_stderr
from ember.model.generate import generate
from ember.quant.calibration import heldout_documents
from ember.quant.gguf_embedding import GGUFEmbedding
from ember.quant.gguf_linear import GGUFLinear
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
    heldout: PerplexityResult | None = None  # the perplexity measurement whole (bits per byte, counts)
    perplexity_se: float | None = None  # bootstrap standard error over windows
    delta_se: float | None = None  # of delta_pct, windows paired with the baseline's, percent points
    windows: WindowScores | None = field(default=None, repr=False)


@dataclass
class WindowScores:
    """Log-likelihood and scored tokens of every rolling window, documents in order: the items
    the bootstrap resamples (two models scored on the same texts have the same windows)."""

    loglikelihood: np.ndarray
    tokens: np.ndarray

    def pairs_with(self, other: WindowScores) -> bool:
        return np.array_equal(self.tokens, other.tokens)


@dataclass
class HeldOutSet:
    """Held-out documents and their token count; `short` when the source held fewer than asked."""

    texts: list[str]
    tokens: int
    requested: int

    @property
    def short(self) -> bool:
        return self.tokens < self.requested

    def note(self, data: list[str]) -> str | None:
        """The line to print when the request was clamped to what the source holds, else None."""
        return clamp_note(data, self.requested, self.tokens, len(self.texts))


def clamp_note(data: list[str], requested: int, tokens: int, documents: int) -> str | None:
    """Say that fewer held-out tokens were scored than --eval-tokens asked for, or None if not."""
    if tokens >= requested:
        return None
    return (f"note: the held-out text of {' '.join(data)} holds {tokens:,} tokens in {documents} documents, "
            f"fewer than --eval-tokens {requested:,}: all of it is scored")


def layer_footprint(model: nn.Module) -> tuple[int, int]:
    """(weights, bytes) of the quantized block layers (not a quantized head), or of the
    quantizable ones in a float model."""
    quant = [m for n, m in model.named_modules() if isinstance(m, QUANT_LINEARS) and n != "lm_head"]
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
        if isinstance(module, GGUFEmbedding):
            total += 4 * module.num_embeddings * module.embedding_dim
            seen.add(id(module.blocks))  # a tied head on the same blocks is not counted twice
            continue
        if isinstance(module, GGUFLinear) and id(module.blocks) in seen:
            continue
        if isinstance(module, QUANT_LINEARS):
            total += 4 * module.in_features * module.out_features + (4 * module.out_features if module.bias is not None else 0)
            continue
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += 4 * p.numel()
    return total


def heldout_set(tokenizer, data: list[str], max_tokens: int) -> HeldOutSet:
    """Held-out documents up to about max_tokens (whole documents, so the last may overshoot), or
    all of them if they hold fewer. bundled: the pretraining split's validation documents, then
    standard-library code past the corpus's code cap (calibration.heldout_documents)."""
    texts, count = [], 0
    for doc in heldout_documents(data):
        texts.append(doc.text)
        count += len(tokenizer.encode(doc.text, add_special_tokens=False))
        if count >= max_tokens:
            break
    return HeldOutSet(texts, count, max_tokens)


def heldout_texts(tokenizer, data: list[str], max_tokens: int) -> list[str]:
    """The texts of heldout_set."""
    return heldout_set(tokenizer, data, max_tokens).texts


@torch.no_grad()
def score_windows(model: nn.Module, tokenizer, texts: list[str], max_len: int,
                  batch_size: int = 8) -> tuple[PerplexityResult, WindowScores]:
    """model_perplexity's result (the same spans, scored per document the same way, so the same
    numbers) and the per-window scores behind it."""
    prefix = prefix_token_id(tokenizer)
    device = next(model.parameters()).device
    result, lls, counts = PerplexityResult(), [], []
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        if not ids:
            continue
        spans = rolling_spans(ids, prefix, max_len)
        scores = [ll for ll, _ in score_spans(model, spans, batch_size, device)]
        result.add(text, sum(scores), len(ids))
        lls += scores
        counts += [s.n_score for s in spans]
    return result, WindowScores(np.asarray(lls, dtype=np.float64), np.asarray(counts, dtype=np.float64))


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
    heldout, windows = score_windows(model, tokenizer, texts, max_len)
    ppl = heldout.token_perplexity
    speed = decode_tokens_per_second(model, decode_tokens) if decode_tokens > 0 else float("nan")
    row = QuantRow(label, 8 * nbytes / max(params, 1), total / 1e6, 4 * params / max(nbytes, 1),
                   fp32_bytes(model) / total, ppl, speed, heldout=heldout,
                   perplexity_se=perplexity_stderr(windows.loglikelihood, windows.tokens), windows=windows)
    if baseline is not None:
        row.delta_pct = 100.0 * (ppl / baseline.perplexity - 1.0)
        if baseline.windows is not None and windows.pairs_with(baseline.windows):
            row.delta_se = perplexity_delta_stderr(windows.loglikelihood, baseline.windows.loglikelihood,
                                                   windows.tokens)
    return row


def _pm(value: str, se: float | None, fmt: str) -> str:
    """value±se as one cell (no spaces: the table splits on whitespace), or value alone without an SE."""
    return value if se is None else f"{value}±{se:{fmt}}"


def format_table(rows: list[QuantRow]) -> str:
    head = (f"{'method':<14} {'bits/w':>7} {'MB':>8} {'x layers':>9} {'x model':>8} {'ppl±se':>15} "
            f"{'Δppl±se':>15} {'tok/s':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        delta = "" if r.delta_pct is None else _pm(f"{r.delta_pct:+.3f}", r.delta_se, ".3f") + "%"
        speed = "-" if math.isnan(r.tokens_per_s) else f"{r.tokens_per_s:.1f}"  # decode not timed
        lines.append(f"{r.label:<14} {r.bits_per_weight:>7.2f} {r.weight_mb:>8.2f} {r.layer_ratio:>8.2f}x "
                     f"{r.model_ratio:>7.2f}x {_pm(f'{r.perplexity:.3f}', r.perplexity_se, '.3f'):>15} "
                     f"{delta:>15} {speed:>8}")
    return "\n".join(lines)


def heldout_line(rows: list[QuantRow]) -> str:
    """What the ± of a table stand on: tokens, documents and windows of the held-out set."""
    r = next((r for r in rows if r.heldout is not None and r.windows is not None), None)
    if r is None:
        return ""
    return (f"held-out: {r.heldout.tokens:,} tokens in {r.heldout.documents} documents, "
            f"{len(r.windows.tokens)} windows of <= {int(r.windows.tokens.max(initial=0))} tokens; "
            f"± = bootstrap standard error over windows (paired with the baseline's for Δppl)")
