"""Engine logprobs (per position: token id -> Logprob) in the three shapes clients expect.

    completion_logprobs(...)  legacy /v1/completions: {"tokens", "token_logprobs", "top_logprobs",
                              "text_offset"}; with echo the prompt comes first and its first entry
                              is null (nothing predicts it); top_logprobs maps token text -> logprob
                              and holds the chosen token plus the top-k (as OpenAI and vLLM)
    chat_logprobs(...)        /v1/chat/completions: {"content": [{"token", "logprob", "bytes",
                              "top_logprobs": [exactly the top-k]}]}
    prompt_logprobs_json(...) vLLM's extra `prompt_logprobs`: per position null or
                              {token id: {"logprob", "rank", "decoded_token"}}
-inf (a token masked out) is sent as -9999.0, as vLLM does, since JSON has no infinity.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ember.engine.request import Logprob, PositionLogprobs


def _lp(x: float) -> float:
    return max(x, -9999.0)


def _text(tid: int, entry: Logprob, decode: Callable[[int], str]) -> str:
    return entry.decoded_token if entry.decoded_token is not None else decode(tid)


def completion_logprobs(token_ids: Sequence[int], positions: Sequence[PositionLogprobs | None],
                        decode: Callable[[int], str], offset: int = 0) -> dict[str, Any]:
    """The legacy shape for tokens and their per-position logprobs (None: no logprob, e.g. the first)."""
    tokens: list[str] = []
    token_lps: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for tid, pos in zip(token_ids, positions):
        entry = pos.get(tid) if pos is not None else None
        text = _text(tid, entry, decode) if entry is not None else decode(tid)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if pos is None or entry is None:
            token_lps.append(None)
            tops.append(None)
            continue
        token_lps.append(_lp(entry.logprob))
        top: dict[str, float] = {}
        for t, e in sorted(pos.items(), key=lambda kv: -kv[1].logprob):
            top.setdefault(_text(t, e, decode), _lp(e.logprob))  # two ids, one text: keep the larger
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(token_ids: Sequence[int], positions: Sequence[PositionLogprobs], k: int,
                  decode: Callable[[int], str]) -> list[dict[str, Any]]:
    """The chat shape's `content` list: each token with exactly its position's top-k alternatives."""
    content = []
    for tid, pos in zip(token_ids, positions):
        entry = pos[tid]
        top = sorted(((t, e) for t, e in pos.items() if e.rank <= k), key=lambda kv: kv[1].rank)[:k]
        content.append({**_chat_entry(tid, entry, decode),
                        "top_logprobs": [_chat_entry(t, e, decode) for t, e in top]})
    return content


def _chat_entry(tid: int, entry: Logprob, decode: Callable[[int], str]) -> dict[str, Any]:
    text = _text(tid, entry, decode)
    return {"token": text, "logprob": _lp(entry.logprob), "bytes": list(text.encode("utf-8"))}


def prompt_logprobs_json(positions: Sequence[PositionLogprobs | None]) -> list[dict[str, Any] | None]:
    return [None if pos is None else
            {str(t): {"logprob": _lp(e.logprob), "rank": e.rank, "decoded_token": e.decoded_token}
             for t, e in pos.items()} for pos in positions]
