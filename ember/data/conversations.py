"""Chat data files: jsonl records in the common fine-tuning formats, read as OpenAI-style messages.

One record per line, in any of these shapes (a file may mix them):

    {"instruction": "...", "input": "...", "output": "..."}                  Alpaca (input optional)
    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]}   OpenAI chat
    {"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", ...}]}     ShareGPT

and preference records for DPO, where prompt/chosen/rejected are strings or message lists:

    {"prompt": "...", "chosen": "...", "rejected": "..."}

Every record becomes a list of {"role", "content"} messages with roles system, user, assistant
or tool. A line that is not JSON or does not fit a format is an error naming the file and line.

    for where, messages in read_conversations("train.jsonl"): ...     # where = "train.jsonl:3"
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ember.data.sources import DataSourceError, jsonl_records

Messages = list[dict[str, Any]]

ROLES = ("system", "user", "assistant", "tool")
# ShareGPT speaker names (several exporters) -> OpenAI roles.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "model": "assistant", "system": "system", "tool": "tool",
                  "function_response": "tool", "observation": "tool"}
FORMATS = ("instruction/output (Alpaca), messages (OpenAI chat) or conversations (ShareGPT)")


class ChatDataError(DataSourceError):
    """A chat or preference data file that cannot be read; the message names file and line."""


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[str, dict]]:
    """(where, record) for each non-blank line; where is "file:line"."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ChatDataError(f"data file {p} does not exist")
    if p.is_dir():
        raise ChatDataError(f"{p} is a folder; pass a .jsonl file")
    try:
        for lineno, record in jsonl_records(p):
            yield f"{p}:{lineno}", record
    except UnicodeDecodeError as e:
        raise ChatDataError(f"{p} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _content(value: Any, where: str, what: str) -> Any:
    # OpenAI content may be a string or a list of parts ({"type": "text", "text": ...}).
    if isinstance(value, str) or (isinstance(value, list) and all(isinstance(p, dict) for p in value)):
        return value
    raise ChatDataError(f"{where}: {what} must be a string (or a list of content parts), "
                        f"got {type(value).__name__}")


def _openai(messages: Any, where: str, field: str = "messages") -> Messages:
    if not isinstance(messages, list) or not messages:
        raise ChatDataError(f"{where}: {field!r} must be a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ChatDataError(f"{where}: {field}[{i}] must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ChatDataError(f"{where}: {field}[{i}] has role {m['role']!r}; use one of {', '.join(ROLES)}")
        msg = dict(m)
        if m.get("content") is not None or "tool_calls" not in m:
            msg["content"] = _content(m.get("content"), where, f"{field}[{i}].content")
        out.append(msg)
    return out


def _sharegpt(turns: Any, where: str) -> Messages:
    if not isinstance(turns, list) or not turns:
        raise ChatDataError(f"{where}: 'conversations' must be a non-empty list of turns")
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            raise ChatDataError(f"{where}: conversations[{i}] must be an object with 'from' and 'value'")
        role = SHAREGPT_ROLES.get(str(t["from"]).lower())
        if role is None:
            raise ChatDataError(f"{where}: conversations[{i}] is from {t['from']!r}; "
                                f"use one of {', '.join(SHAREGPT_ROLES)}")
        out.append({"role": role, "content": _content(t["value"], where, f"conversations[{i}].value")})
    return out


def _alpaca(record: dict, where: str) -> Messages:
    parts = {k: record.get(k, "") for k in ("instruction", "input", "output")}
    bad = [k for k, v in parts.items() if not isinstance(v, str)]
    if bad:
        raise ChatDataError(f"{where}: Alpaca field {bad[0]!r} must be a string")
    prompt = parts["instruction"] + (f"\n\n{parts['input']}" if parts["input"].strip() else "")
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": parts["output"]}]
    if isinstance(record.get("system"), str) and record["system"].strip():
        messages.insert(0, {"role": "system", "content": record["system"]})
    return messages


def to_messages(record: dict, where: str) -> Messages:
    """The conversation of one SFT record (see the module docstring for the formats)."""
    if "messages" in record:
        return _openai(record["messages"], where)
    if "conversations" in record:
        return _sharegpt(record["conversations"], where)
    if "instruction" in record and "output" in record:
        return _alpaca(record, where)
    raise ChatDataError(f"{where}: unknown record with keys {sorted(record)[:6]}; expected {FORMATS}")


def read_conversations(path: str | os.PathLike) -> Iterator[tuple[str, Messages]]:
    """(where, messages) for every record of an SFT jsonl file."""
    for where, record in read_jsonl(path):
        yield where, to_messages(record, where)


def to_preference(record: dict, where: str) -> tuple[Messages, Messages, Messages]:
    """(prompt, chosen, rejected) messages of one preference record.

    A string prompt is one user turn and a string answer one assistant turn; message lists are
    taken as they are (TRL's conversational format).
    """
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in record]
    if missing:
        raise ChatDataError(f"{where}: preference records need prompt, chosen and rejected; "
                            f"missing {', '.join(missing)}")

    def side(key: str, role: str) -> Messages:
        value = record[key]
        if isinstance(value, str):
            return [{"role": role, "content": value}]
        return _openai(value, where, key)

    prompt, chosen, rejected = side("prompt", "user"), side("chosen", "assistant"), side("rejected", "assistant")
    for key, answer in (("chosen", chosen), ("rejected", rejected)):
        if answer[-1]["role"] != "assistant":
            raise ChatDataError(f"{where}: {key!r} must end with an assistant message")
    return prompt, chosen, rejected
