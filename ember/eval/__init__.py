"""Evaluation: the same tasks on an ember model in process or on any OpenAI-compatible server.

    loglikelihood.py   token spans and their batched scoring (the one likelihood primitive)
    perplexity.py      rolling windows; token/word/byte perplexity, bits per byte
    backend.py         the Backend protocol (loglikelihood, loglikelihood_rolling, generate)
    local_backend.py   an ember model in this process
    http_backend.py    an OpenAI-compatible server (/v1/completions echo+logprobs, /v1/chat/completions)
    tasks/             perplexity, mmlu, gsm8k, truthfulqa, mtbench (lm-evaluation-harness definitions)
    judge.py           MT-Bench-style LLM judge: [[rating]] and pairwise verdicts in both orders
    stats.py           standard errors; results.py: tables and results JSON; report.py: quickstart table
    datafile.py        benchmark file reading; data/: small sample sets in each benchmark's format

`ember eval --help` is the command line (ember/commands/eval.py).
"""
