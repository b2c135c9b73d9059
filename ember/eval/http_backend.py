"""The HTTP backend: any OpenAI-compatible server (ember serve, vLLM, llama.cpp, ...).

    backend = OpenAIBackend("http://127.0.0.1:8000", tokenizer=load_tokenizer("runs/model"))

Likelihoods use `/v1/completions` the way lm-evaluation-harness's `local-completions` does:
the prompt is sent as token ids with `echo=true, logprobs=1, max_tokens=1, temperature=0`, and
the scored tokens' log-probabilities are read back from `logprobs.token_logprobs` at their
positions in the echoed prompt (the one generated token is ignored; `max_tokens=0` is not
accepted by every server). A token is greedy when its log-prob equals the best of
`top_logprobs`. Since ids are sent, the model's tokenizer must be known locally (--tokenizer);
the server only has to echo prompt log-probabilities.

Generation uses `/v1/completions` for string prompts (token ids when the tokenizer is known,
as the harness sends them) and `/v1/chat/completions` for chat messages. Requests are retried
on connection errors, timeouts, 429 and 5xx with exponential backoff; `OPENAI_API_KEY`, when
set, is sent as a bearer token.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from ember.eval.backend import EvalBackendError, GenerationParams, Prompt, TokenBackend, cut_at_stop
from ember.eval.loglikelihood import Span

log = logging.getLogger(__name__)

_RETRY_STATUS = {408, 429, 500, 502, 503, 504}
_DEFAULT_MAX_LEN = 2048  # the harness's default for API models that do not report one
_GREEDY_TOL = 1e-5  # servers may compute top-k and the chosen token's log-prob in separate kernels


def api_root(base_url: str) -> str:
    """'http://h:8000', 'http://h:8000/' and 'http://h:8000/v1' all mean 'http://h:8000/v1'."""
    url = base_url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise EvalBackendError(f"--base-url {base_url!r} must start with http:// or https://")
    return url if url.endswith("/v1") else url + "/v1"


class OpenAIBackend(TokenBackend):
    """Talks to `{base_url}/v1/...`; see the module docstring."""

    def __init__(self, base_url: str, model: str | None = None, tokenizer=None, max_len: int | None = None,
                 batch_size: int = 8, stride: int | None = None, timeout: float = 600.0, max_retries: int = 3,
                 api_key: str | None = None, progress: bool = False) -> None:
        try:
            import httpx
        except ModuleNotFoundError:
            raise EvalBackendError("--base-url needs httpx: pip install 'ember[eval]'") from None
        self.root = api_root(base_url)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.stride = stride
        self.max_retries = max_retries
        self.progress = progress
        self._model = model
        self._max_len = max_len
        self._server_max_len: int | None = None
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.Client(timeout=timeout, headers=headers)

    # -- model metadata -------------------------------------------------------------------
    def _discover(self) -> None:
        data = self._request("GET", "/models").get("data") or []
        if not data or not isinstance(data[0], dict) or "id" not in data[0]:
            raise EvalBackendError(f"{self.root}/models lists no model: pass --served-model NAME")
        self._model = self._model or data[0]["id"]
        limit = data[0].get("max_model_len")
        self._server_max_len = int(limit) if isinstance(limit, int) else None

    @property
    def name(self) -> str:  # type: ignore[override]
        if self._model is None:
            self._discover()
        return self._model  # type: ignore[return-value]

    @property
    def max_len(self) -> int:  # type: ignore[override]
        """Most tokens one forward sees; a scoring prompt is max_len + 1 tokens plus 1 generated."""
        if self._max_len is None:
            if self._model is None:
                self._discover()
            elif self._server_max_len is None:
                try:
                    self._discover()
                except EvalBackendError:
                    pass
            self._max_len = self._server_max_len - 2 if self._server_max_len else _DEFAULT_MAX_LEN
        return self._max_len

    @max_len.setter
    def max_len(self, value: int) -> None:
        self._max_len = value

    # -- transport ------------------------------------------------------------------------
    def _request(self, method: str, path: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        import httpx

        url = self.root + path
        for attempt in range(self.max_retries + 1):
            last = attempt == self.max_retries
            try:
                resp = self.client.request(method, url, json=payload)
            except httpx.TransportError as e:
                if last:
                    raise EvalBackendError(f"cannot reach {url} ({type(e).__name__}: {e}): "
                                           "is the server running at --base-url?") from None
            else:
                if resp.status_code < 400:
                    try:
                        return resp.json()
                    except ValueError:
                        raise EvalBackendError(f"{url} did not answer JSON: {resp.text[:200]!r}") from None
                if resp.status_code not in _RETRY_STATUS or last:
                    raise EvalBackendError(f"{url} answered HTTP {resp.status_code}: {_error_text(resp)}")
            time.sleep(min(0.5 * 2 ** attempt, 8.0))
        raise AssertionError("unreachable")

    # -- likelihoods ----------------------------------------------------------------------
    def score_spans(self, spans: Sequence[Span]) -> list[tuple[float, bool]]:
        out: list[tuple[float, bool]] = []
        for b in tqdm(range(0, len(spans), self.batch_size), desc="log-likelihood", unit="request",
                      disable=not self.progress):
            chunk = spans[b:b + self.batch_size]
            reply = self._request("POST", "/completions", {
                "model": self.name, "prompt": [list(s.tokens) for s in chunk], "max_tokens": 1,
                "temperature": 0, "logprobs": 1, "echo": True, "seed": 1234})
            for span, choice in zip(chunk, _choices(reply, len(chunk), "/completions")):
                out.append(_span_score(span, choice, self.root))
        return out

    # -- generation -----------------------------------------------------------------------
    def generate(self, prompts: Sequence[Prompt], params: GenerationParams) -> list[str]:
        common = {"model": self.name, "max_tokens": params.max_tokens, "temperature": params.temperature,
                  "seed": params.seed}
        if params.stop:
            common["stop"] = list(params.stop)[:4]  # the OpenAI API takes at most 4; all are cut below
        texts: list[str | None] = [None] * len(prompts)
        raw = [i for i, p in enumerate(prompts) if isinstance(p, str)]
        for b in tqdm(range(0, len(raw), self.batch_size), desc="generate", unit="request",
                      disable=not self.progress or not raw):
            idx = raw[b:b + self.batch_size]
            batch = [self.prompt_ids(prompts[i], params) if self.tokenizer is not None else prompts[i]
                     for i in idx]
            reply = self._request("POST", "/completions", {**common, "prompt": batch})
            for i, choice in zip(idx, _choices(reply, len(idx), "/completions")):
                texts[i] = choice.get("text") or ""
        chats = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
        for i in tqdm(chats, desc="chat", unit="request", disable=not self.progress or not chats):
            reply = self._request("POST", "/chat/completions", {**common, "messages": list(prompts[i])})
            message = _choices(reply, 1, "/chat/completions")[0].get("message") or {}
            texts[i] = message.get("content") or ""
        return [cut_at_stop(t or "", params.stop) for t in texts]


def _error_text(resp) -> str:
    try:
        body = resp.json()
        err = body.get("error", body) if isinstance(body, dict) else body
        return str(err.get("message", err) if isinstance(err, dict) else err)[:300]
    except ValueError:
        return resp.text[:300]


def _choices(reply: dict[str, Any], n: int, endpoint: str) -> list[dict[str, Any]]:
    choices = reply.get("choices")
    if not isinstance(choices, list) or len(choices) != n:
        got = len(choices) if isinstance(choices, list) else "no"
        raise EvalBackendError(f"{endpoint} returned {got} choices for {n} prompts")
    return sorted(choices, key=lambda c: c.get("index", 0))


def _span_score(span: Span, choice: dict[str, Any], root: str) -> tuple[float, bool]:
    lp = choice.get("logprobs") or {}
    token_lps = lp.get("token_logprobs") or []
    n = len(span.tokens)
    if len(token_lps) < n:
        raise EvalBackendError(f"{root}/completions did not echo the prompt's log-probabilities "
                               f"({len(token_lps)} for {n} prompt tokens): the server must support "
                               "echo=true with logprobs")
    scored = token_lps[n - span.n_score:n]
    if any(v is None for v in scored):
        raise EvalBackendError(f"{root}/completions returned null log-probabilities for scored tokens")
    top = lp.get("top_logprobs") or []
    greedy = len(top) >= n and all(
        t and v >= max(t.values()) - _GREEDY_TOL for v, t in zip(scored, top[n - span.n_score:n]))
    return float(sum(scored)), bool(greedy)
