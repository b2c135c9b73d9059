"""Constrained decoding cost: decode tokens/s of JSON-schema requests against free ones, same run.

    PYTHONPATH=. python bench/structured.py --threads 1      # SmolLM2-135M, batch 1 and 32 (~30 s)
    PYTHONPATH=. python bench/structured.py --batches 32 --tokens 48 --threads 2

Each row decodes `--batch` copies of one chat prompt (already in the prefix cache, so the
time is decode) for `--tokens` output tokens (greedy, ignore_eos) on the real model, free and
then constrained by a JSON schema (a list of strings the model fills at length, so constrained
outputs run as long as free ones), alternating the two --rounds times; the median output
tokens per wall second, and per CPU second of this process (the mask thread's time included;
other jobs on a shared machine disturb it much less).
Then the mask alone: llguidance filling 1 and 32 masks over the 49,152-token vocabulary, the
work the engine overlaps with the forward pass. Timings on a shared machine vary; ratios are
within one run. Target (issue 22): masks cost <= 10 % at batch 32.

Measured (2 shared cores, --threads 1, 32 tokens): batch 1 24.7 free vs 24.0 constrained tok/s
(3.0 % cost), batch 32 235.9 vs 219.7 (6.9 %; 7.2 % per CPU-second); mask fill 17 us per step
for one request, 121 us for 32.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ember  # noqa: E402
from ember.checkpoint.registry import known_model_file  # noqa: E402
from ember.engine import LLM, SamplingParams, StructuredOutputsParams  # noqa: E402

SCHEMA = {"type": "object", "properties": {"facts": {"type": "array", "items": {"type": "string"}}},
          "required": ["facts"], "additionalProperties": False}


def decode_rate(llm: LLM, batch: int, tokens: int, constrained: bool) -> tuple[float, float]:
    """Output tokens per wall second and per CPU second of this process (masks' thread included)."""
    so = StructuredOutputsParams(json=SCHEMA) if constrained else None
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True, structured_outputs=so)
    question = [{"role": "user", "content": "List many facts about the ocean as JSON."}]
    prompt = llm.get_tokenizer().apply_chat_template(question, add_generation_prompt=True, tokenize=True)
    llm.generate([prompt], SamplingParams(max_tokens=1))  # the prompt's blocks in the prefix cache
    wall, cpu = time.perf_counter(), time.process_time()
    outs = llm.generate([prompt] * batch, params)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    return generated / wall, generated / cpu


def mask_times(llm: LLM, batch: int, steps: int = 40) -> float:
    """Median seconds to fill `batch` masks with the engine's masker, advancing along a JSON text."""
    engine = llm.engine
    tok = engine.tokenizer
    text = tok.encode('{"facts": ["The ocean covers most of Earth", "It is salty", "Whales live there"]}',
                      add_special_tokens=False)[:steps]
    matchers = [engine.grammars.compile(StructuredOutputsParams(json=SCHEMA)) for _ in range(batch)]
    times = []
    for t in text:
        t0 = time.perf_counter()
        engine.masker.start(matchers).result()
        times.append(time.perf_counter() - t0)
        for m in matchers:
            m.consume_token(t)
    return statistics.median(times[1:])  # the first mask of a fresh grammar builds its lexer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = known_model_file("smollm2-135m-instruct")
    llm = LLM(ember.load_model(path), ember.load_tokenizer(path), max_num_seqs=64, kv_cache_memory=1.0)
    decode_rate(llm, 2, 8, True)  # warm-up: the native kernels, the grammar's tokenizer view
    print(f"SmolLM2-135M-Instruct, {torch.get_num_threads()} threads, {args.tokens} tokens per request, greedy")
    print(f"{'batch':>5} {'free tok/s':>11} {'json tok/s':>11} {'cost':>7}   per CPU-second: "
          f"{'free':>7} {'json':>7} {'cost':>7}")
    for batch in args.batches:
        free, json_ = [], []
        for _ in range(args.rounds):
            free.append(decode_rate(llm, batch, args.tokens, False))
            json_.append(decode_rate(llm, batch, args.tokens, True))
        (f, fc), (j, jc) = [tuple(statistics.median(x) for x in zip(*runs)) for runs in (free, json_)]
        print(f"{batch:>5} {f:>11.1f} {j:>11.1f} {100 * (f - j) / f:>6.1f}%   {'':>16}"
              f"{fc:>7.1f} {jc:>7.1f} {100 * (fc - jc) / fc:>6.1f}%")
    for batch in (1, 32):
        print(f"mask fill, batch {batch:>2}: {1e6 * mask_times(llm, batch):8.0f} us per step (median)")


if __name__ == "__main__":
    main()
