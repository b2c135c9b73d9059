"""Prefix-cache-aware routing across engine replicas: which replica already holds a prompt's prefix.

    hashes = prefix_hashes("/v1/chat/completions", body)      # chained hashes of the prompt's leading blocks
    affinity = PrefixAffinity(imbalance_threshold=8)
    replica = affinity.choose(hashes, {"r1": 3, "r2": 5})      # queue lengths of the candidates
    affinity.record(hashes, replica)                           # after the request was sent there

Each replica's engine keeps a prefix cache of full KV blocks, so a prompt is cheap on the replica
that has already seen its first blocks and expensive anywhere else. The front does not tokenize:
it hashes the prompt's text in blocks of `block_chars` characters (token-id prompts in blocks of
`block_tokens` ids), each hash chained to the previous one as the engine chains its block hashes,
so two prompts share the first k hashes exactly when they share their first k blocks of text.
A 64-character block is ~16 tokens of English, the engine's default block size.

The policy (the same idea as SGLang's cache-aware router and Ray's PrefixCacheAffinityRouter,
with a hash table instead of a radix tree): send a request to the replica that was last sent the
longest matching prefix, unless that replica has `imbalance_threshold` more requests in flight than
the least loaded one; then (and when nothing matches) send it to the least loaded (ties at random). The table
remembers the most recent `max_entries` block hashes (LRU), which bounds its memory whatever the
traffic; a replica that dies is forgotten.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, TypeVar

R = TypeVar("R", bound=Hashable)

BLOCK_CHARS = 64
BLOCK_TOKENS = 16
MAX_BLOCKS = 256  # 16k characters: longer shared prefixes route the same as this one


def _text_of_content(content: Any) -> str:
    """A chat message's content as text (OpenAI's list of parts: the text parts, in order)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return "" if content is None else json.dumps(content, sort_keys=True)


def prompt_of(path: str, body: bytes) -> str | list[int] | None:
    """The prompt of an OpenAI request body as routing sees it: completions' prompt (text or ids; the
    first of a list), chat's messages flattened (role and text, in order); None when there is none
    (another route, a malformed body: the replica answers those, routing need not understand them)."""
    if not path.endswith(("/completions",)):
        return None
    try:
        req = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(req, dict):
        return None
    if path.endswith("/chat/completions"):
        messages = req.get("messages")
        if not isinstance(messages, list):
            return None
        return "".join(f"<{m.get('role', '')}>{_text_of_content(m.get('content'))}"
                       for m in messages if isinstance(m, dict))
    prompt = req.get("prompt")
    if isinstance(prompt, list) and prompt and not all(isinstance(t, int) for t in prompt):
        prompt = prompt[0]  # a batch of prompts: route by the first
    if isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)):
        return prompt
    return None


def block_hashes(prompt: str | Sequence[int], block_chars: int = BLOCK_CHARS, block_tokens: int = BLOCK_TOKENS,
                 max_blocks: int = MAX_BLOCKS) -> list[int]:
    """Chained 64-bit hashes of the prompt's full leading blocks (at most max_blocks)."""
    if isinstance(prompt, str):
        data, size = prompt.encode("utf-8"), block_chars
        blocks = [data[i:i + size] for i in range(0, len(data) - size + 1, size)]
    else:
        size = block_tokens
        blocks = [json.dumps(list(prompt[i:i + size])).encode() for i in range(0, len(prompt) - size + 1, size)]
    out: list[int] = []
    prev = b""
    for block in blocks[:max_blocks]:
        prev = hashlib.blake2b(prev + block, digest_size=8).digest()
        out.append(int.from_bytes(prev, "little"))
    return out


def prefix_hashes(path: str, body: bytes, block_chars: int = BLOCK_CHARS, block_tokens: int = BLOCK_TOKENS,
                  max_blocks: int = MAX_BLOCKS) -> list[int]:
    """The routing key of a request: block_hashes of its prompt, [] when it has none."""
    prompt = prompt_of(path, body)
    return [] if prompt is None else block_hashes(prompt, block_chars, block_tokens, max_blocks)


class PrefixAffinity:
    """Which replica was last sent each block hash, and the choice that follows (module docstring)."""

    def __init__(self, imbalance_threshold: int = 8, max_entries: int = 1 << 18, seed: int | None = None) -> None:
        if imbalance_threshold < 0 or max_entries < 1:
            raise ValueError("imbalance_threshold must be >= 0 and max_entries >= 1")
        self.imbalance_threshold = imbalance_threshold
        self.max_entries = max_entries
        self._rng = random.Random(seed)
        self._owner: OrderedDict[int, Hashable] = OrderedDict()

    def __len__(self) -> int:
        return len(self._owner)

    def match(self, hashes: Sequence[int], candidates: Mapping[R, int]) -> tuple[R | None, int]:
        """(the candidate last sent the longest prefix of `hashes`, how many blocks it matched)."""
        for n in range(len(hashes), 0, -1):
            owner = self._owner.get(hashes[n - 1])
            if owner is not None and owner in candidates:
                return owner, n  # type: ignore[return-value]
        return None, 0

    def choose(self, hashes: Sequence[int], queue_lens: Mapping[R, int]) -> R:
        """The replica for a request with these hashes, given each candidate's requests in flight."""
        if not queue_lens:
            raise ValueError("no candidate replica")
        fewest = min(queue_lens.values())
        owner, _ = self.match(hashes, queue_lens)
        if owner is not None and queue_lens[owner] - fewest <= self.imbalance_threshold:
            return owner
        # ties broken at random: an idle fleet still spreads requests that share nothing
        return self._rng.choice([r for r, n in queue_lens.items() if n == fewest])

    def record(self, hashes: Sequence[int], replica: Hashable) -> None:
        """The request with these hashes went to `replica`: its blocks are (about to be) cached there."""
        for h in hashes:
            self._owner[h] = replica
            self._owner.move_to_end(h)
        while len(self._owner) > self.max_entries:
            self._owner.popitem(last=False)

    def forget(self, replica: Hashable) -> None:
        """A replica went away: none of its blocks can be hit any more."""
        for h in [h for h, r in self._owner.items() if r == replica]:
            del self._owner[h]
