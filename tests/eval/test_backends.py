"""Both backends against a direct transformers computation on the same tiny weights.

The in-process backend runs ember's Transformer; the HTTP backend talks to a fake
OpenAI-compatible server that runs transformers (tests/eval/openai_fake.py). Log-likelihoods
of (context, continuation) pairs and of whole documents must equal transformers' within 1e-4,
and greedy generations must be identical.
"""

from __future__ import annotations

import pytest
import torch

from ember.eval.backend import GenerationParams
from ember.eval.loglikelihood import encode_pair

REQUESTS = [
    ("Question: What does the with statement manage?\nAnswer:", " A context manager."),
    ("The keyword that defines a function is ", "def"),  # trailing space moves to the continuation
    ("", "import os\nprint(os.getcwd())"),  # empty context: conditioned on the prefix (BOS) token
    ("x = [1, 2, 3]\n", "y = x"),
]


def _hf_pair_ids(hf_tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's tokenisation, written against the transformers tokenizer."""
    enc = lambda s: hf_tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    if not context:
        return [hf_tok.bos_token_id], enc(continuation)
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx = enc(context)
    return ctx, enc(context + continuation)[len(ctx):]


@torch.no_grad()
def _hf_loglikelihood(hf_model, tokens: list[int], n_score: int) -> tuple[float, bool]:
    logp = torch.log_softmax(hf_model(torch.tensor([tokens[:-1]])).logits[0].double(), -1)
    preds = logp[-n_score:]
    target = torch.tensor(tokens[-n_score:])
    return preds.gather(-1, target[:, None]).sum().item(), bool((preds.argmax(-1) == target).all())


def test_encode_pair_follows_the_harness(tokenizer) -> None:
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    ctx, cont = encode_pair(enc, "Answer: ", "B", prefix_id=0)
    assert ctx == enc("Answer:") and ctx + cont == enc("Answer: B")
    assert encode_pair(enc, "", "hello", prefix_id=7) == ([7], enc("hello"))


@pytest.mark.parametrize("backend_name", ["local", "remote"])
def test_pair_loglikelihoods_match_transformers(backend_name, request, hf_model, tiny_dir) -> None:
    import transformers

    hf_tok = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    backend = request.getfixturevalue(backend_name)
    long_context = "A list is an ordered sequence. " * 120  # > max_len tokens: cut from the left
    requests = REQUESTS + [(long_context, " Done.")]
    got = backend.loglikelihood(requests)
    for (context, continuation), (ll, greedy) in zip(requests, got):
        ctx, cont = _hf_pair_ids(hf_tok, context, continuation)
        tokens = (ctx + cont)[-(backend.max_len + 1):]
        ref_ll, ref_greedy = _hf_loglikelihood(hf_model, tokens, len(cont))
        assert abs(ll - ref_ll) < 1e-4, (context[:30], ll, ref_ll)
        assert greedy == ref_greedy
    assert len({round(ll, 3) for ll, _ in got}) == len(got)  # distinct numbers, not a constant


@pytest.mark.parametrize("backend_name", ["local", "remote"])
def test_rolling_loglikelihood_matches_transformers(backend_name, request, hf_model, tokenizer) -> None:
    backend = request.getfixturevalue(backend_name)
    texts = ["Strings are immutable sequences of characters.", "A generator yields values lazily.\n" * 3]
    for text, (ll, n_tokens) in zip(texts, backend.loglikelihood_rolling(texts)):
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert n_tokens == len(ids)
        ref, _ = _hf_loglikelihood(hf_model, [tokenizer.bos_token_id, *ids], len(ids))
        assert abs(ll - ref) < 1e-4


def test_windowed_rolling_is_the_same_through_both_backends(local, remote) -> None:
    text = "Modules are files of Python code. The import statement runs a module once. " * 4
    results = []
    for backend in (local, remote):
        saved = backend.max_len
        backend.max_len, backend.stride = 16, 8
        try:
            results.append(backend.loglikelihood_rolling([text])[0])
        finally:
            backend.max_len, backend.stride = saved, None
    (a, n), (b, m) = results
    assert n == m > 16 and abs(a - b) < 1e-4


def test_greedy_generation_is_the_same_through_both_backends(local, remote) -> None:
    prompts = ["Question: What is a tuple?\nAnswer:", [{"role": "user", "content": "Explain decorators."}]]
    params = GenerationParams(max_tokens=12, stop=("\n\n",))
    a, b = local.generate(prompts, params), remote.generate(prompts, params)
    assert a == b
    assert all(isinstance(t, str) for t in a) and any(a)
