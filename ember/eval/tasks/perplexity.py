"""Perplexity of text files through any backend (the harness's `loglikelihood_rolling` tasks).

Data: .txt/.md/.rst/.py files (each one document) or .jsonl with a "text" field (each line one
document), or folders of them (ember.data.sources.path_documents). Each document is scored
whole in rolling windows (ember.eval.perplexity); the metrics pool documents by summing
log-likelihoods and counts, as wikitext does in the harness:

    word_perplexity  byte_perplexity  bits_per_byte  token_perplexity (tokenizer-dependent)

Standard errors come from a bootstrap over documents (the harness reports none for these).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ember.data.sources import path_documents
from ember.eval.backend import Backend
from ember.eval.datafile import EvalDataError
from ember.eval.perplexity import PerplexityResult, count_bytes, count_words
from ember.eval.results import Metric, TaskResult
from ember.eval.stats import bootstrap_stderr
from ember.eval.tasks import TaskOptions


def evaluate(backend: Backend, data: Path, options: TaskOptions) -> TaskResult:
    if options.num_fewshot:
        raise EvalDataError("perplexity has no few-shot examples: drop --num-fewshot")
    docs = list(path_documents([data]))[:options.limit]
    scores = backend.loglikelihood_rolling([d.text for d in docs])
    result = PerplexityResult()
    samples = []
    for doc, (ll, tokens) in zip(docs, scores):
        if tokens:
            result.add(doc.text, ll, tokens)
            samples.append({"source": doc.source, "loglikelihood": ll, "tokens": tokens,
                            "words": count_words(doc.text), "bytes": count_bytes(doc.text)})
    if not samples:
        raise EvalDataError(f"{data}: no text to score")
    ll = [s["loglikelihood"] for s in samples]
    exp_ratio = lambda lls, counts: np.exp(-lls.sum(1) / counts.sum(1))  # noqa: E731
    bpb = lambda lls, counts: -lls.sum(1) / counts.sum(1) / np.log(2)  # noqa: E731
    rows = [("word_perplexity", result.word_perplexity, exp_ratio, "words"),
            ("byte_perplexity", result.byte_perplexity, exp_ratio, "bytes"),
            ("bits_per_byte", result.bits_per_byte, bpb, "bytes"),
            ("token_perplexity", result.token_perplexity, exp_ratio, "tokens")]
    n = result.documents
    return TaskResult([Metric("perplexity", name, value, bootstrap_stderr(fn, [ll, [s[c] for s in samples]]), n)
                       for name, value, fn, c in rows], samples)

