"""Speculative decoding speed-up at batch 1: prompt lookup (ngram) against the plain engine, same run.

    PYTHONPATH=. python bench/spec_decode.py --threads 1 --rounds 3      # SmolLM2-135M, ~3 min
    PYTHONPATH=. python bench/spec_decode.py --k 3 --rounds 3 --tokens 160
    PYTHONPATH=. python bench/spec_decode.py --draft-model DIR_OR_NAME   # adds a draft-model arm

Both sides are ember's engine on the same SmolLM2-135M-Instruct Q4_1 model object (native
kernels, fp32 activations), same threads, one request at a time, greedy, up to --tokens output
tokens: the baseline decodes one token per forward; the speculative side drafts up to k tokens by
prompt lookup (--speculative-config {"method": "ngram", "num_speculative_tokens": k}) and
verifies them in one forward of k + 1 positions. Each prompt runs on both sides alternately,
--rounds times (the order flips every round), and the outputs are checked to be the same tokens.
Decode speed = (output tokens - 1) / (finish - first token) from the engine's request metrics:
the prefill, the same on both sides, is left out.

Two workloads: input-grounded prompts (answers that copy from the prompt: a RAG answer quoting
its passage, code edits that rewrite most of the code) where drafts are accepted, and open-ended
prompts (stories, explanations) where prompt lookup rarely finds a match and each rejected
draft costs verification rows: the slowdown there is reported as measured. The figure per
workload is total decode tokens / total decode seconds of each side, and their ratio.
Issue 23's target: >= 1.5x on the input-grounded workload.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ember.engine import LLM, SamplingParams  # noqa: E402

PASSAGE = ("The Great Barrier Reef is the world's largest coral reef system, composed of over 2,900 individual "
           "reefs and 900 islands stretching for over 2,300 kilometres over an area of approximately 344,400 "
           "square kilometres. The reef is located in the Coral Sea, off the coast of Queensland, Australia. It "
           "can be seen from outer space and is the world's biggest single structure made by living organisms.")
CODE = ("def total_price(items, tax_rate):\n    result = 0\n    for item in items:\n        result = result + "
        "item.price * item.quantity\n    result = result * (1 + tax_rate)\n    return result\n")
CODE2 = ("class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n        "
         "self.items.append(item)\n\n    def pop(self):\n        return self.items.pop()\n\n    def size(self):\n"
         "        return len(self.items)\n")
GROUNDED = [
    f"Context:\n{PASSAGE}\n\nUsing only the context, answer: where is the Great Barrier Reef and how large is it? "
    "Quote the context.",
    f"Repeat the following passage exactly, word for word:\n\n{PASSAGE}",
    f"Rename the variable `result` to `total` in this code and show the whole code:\n\n```python\n{CODE}```",
    f"Add type hints to this code and show the whole class:\n\n```python\n{CODE2}```",
    f"Fix the indentation and show the corrected code:\n\n```python\n{CODE2}```",
    f"Context:\n{PASSAGE}\n\nWhat is the reef made of? Answer with a sentence from the context.",
]
OPEN = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a bicycle works to a ten-year-old.",
    "Give me five ideas for a weekend trip and why each is fun.",
    "Write a poem about the first snow of winter.",
]


def decode_run(llm: LLM, prompt: list[int], tokens: int) -> tuple[list[int], int, float]:
    """(output tokens, decoded tokens, decode seconds) of one request alone."""
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=tokens))[0]
    m = out.metrics
    return out.outputs[0].token_ids, len(out.outputs[0].token_ids) - 1, m.finished_time - m.first_token_time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--tokens", type=int, default=128, help="most output tokens per request")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--draft-model", default=None, help="also measure method draft_model with this model")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    plain = LLM(args.model, kv_cache_memory=0.25)
    tok = plain.get_tokenizer()
    arms = {"ngram": {"method": "ngram", "num_speculative_tokens": args.k}}
    if args.draft_model:
        arms["draft_model"] = {"method": "draft_model", "model": args.draft_model, "num_speculative_tokens": args.k}
    spec = {name: LLM(plain.engine.model, tok, kv_cache_memory=0.25, speculative_config=conf)
            for name, conf in arms.items()}
    print(f"model {args.model} (Q4_1 blocks, native kernels), {args.threads} thread(s), greedy, batch 1, "
          f"<= {args.tokens} output tokens, {args.rounds} rounds; baseline: the plain engine (1 token per "
          f"forward); speculative: {json.dumps(arms)} (k drafts verified in one forward)")
    chat = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
            for q in GROUNDED + OPEN]
    for llm in [plain, *spec.values()]:  # warm-up: kernels compiled, pages touched
        llm.generate([chat[0]], SamplingParams(temperature=0, max_tokens=8))

    for workload, prompts in (("input-grounded", chat[:len(GROUNDED)]), ("open-ended", chat[len(GROUNDED):])):
        totals = {name: [0, 0.0] for name in ["plain", *spec]}
        before = {name: llm.engine.stats() for name, llm in spec.items()}
        for r in range(args.rounds):
            for prompt in prompts:
                order = [("plain", plain), *spec.items()]
                if r % 2:
                    order.reverse()
                outs = {}
                for name, llm in order:
                    ids, n, secs = decode_run(llm, prompt, args.tokens)
                    outs[name] = ids
                    totals[name][0] += n
                    totals[name][1] += secs
                for name in spec:
                    if outs[name] != outs["plain"]:
                        raise SystemExit(f"{name}: greedy output differs from the plain engine's")
        base = totals["plain"][0] / totals["plain"][1]
        print(f"\n{workload} ({len(prompts)} prompts x {args.rounds} rounds, "
              f"{totals['plain'][0] // args.rounds} decode tokens per round)")
        print(f"  plain engine          {base:7.1f} tok/s")
        for name, llm in spec.items():
            s, b = llm.engine.stats(), before[name]
            drafted = s.spec_decode_num_draft_tokens - b.spec_decode_num_draft_tokens
            accepted = s.spec_decode_num_accepted_tokens - b.spec_decode_num_accepted_tokens
            steps = s.spec_decode_num_drafts - b.spec_decode_num_drafts
            rate = totals[name][0] / totals[name][1]
            print(f"  speculative {name:<10}{rate:7.1f} tok/s   {rate / base:.2f}x   acceptance "
                  f"{accepted / max(drafted, 1):.0%} ({accepted}/{drafted} drafts, "
                  f"{accepted / max(steps, 1):.2f} accepted per verification)")
    print("\nsame greedy tokens on both sides for every prompt")


if __name__ == "__main__":
    main()
