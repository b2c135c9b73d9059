"""Supervised fine-tuning examples: conversations rendered by the chat template, loss on assistant tokens.

    examples = load_sft_examples("train.jsonl", tokenizer, max_len=512)
    batches = SFTBatches(examples, micro_batch=8, pad_id=tok.pad_token_id, pack=True, seq_len=512)
    batch = batches.next_batch()   # {"input_ids", "labels"} (B, T), packed: + "positions", "segments"

Assistant spans are found by rendering prefixes, so any chat template works without special
markup: for assistant message i,

    before  = render(messages[:i], add_generation_prompt=True)    ends with the assistant header
    through = render(messages[:i + 1])                             ends after its end-of-turn token

and the characters between the two (past their common prefix, trailing whitespace dropped) are
that turn's answer including its end-of-turn token. The whole conversation is tokenized once and
a token is trained on when it starts inside a span (character offsets from the tokenizer), so the
ids are exactly what `apply_chat_template(..., tokenize=True)` gives.

Packing concatenates whole examples into rows of at most seq_len tokens; `positions` restart at 0
for each example and `segments` numbers them, so block-diagonal attention
(ember/train/packing.py) makes a packed row compute exactly what the examples would alone.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from ember.data.conversations import ChatDataError, Messages, read_conversations
from ember.tokenizer import Tokenizer, TokenizerError

log = logging.getLogger(__name__)

T = TypeVar("T")
IGNORE_INDEX = -100  # label of tokens without loss (PyTorch's and Hugging Face's convention)


@dataclass
class TokenizedChat:
    """Token ids of one rendered conversation and its labels (IGNORE_INDEX where no loss)."""

    input_ids: list[int]
    labels: list[int]

    @property
    def loss_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)

    def __len__(self) -> int:
        return len(self.input_ids)


def _render(tok: Tokenizer, messages: Messages, generation_prompt: bool) -> str:
    return tok.apply_chat_template(messages, add_generation_prompt=generation_prompt)  # type: ignore[return-value]


def _is_blank(content: object) -> bool:
    if isinstance(content, list):  # OpenAI content parts
        return all(_is_blank(part.get("text")) for part in content)
    return not isinstance(content, str) or not content.strip()


def assistant_spans(tok: Tokenizer, messages: Messages, first: int = 0) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of assistant messages at index >= first.

    An assistant message with nothing before it has no prompt to answer, and an empty one (no
    text, no tool calls) nothing to learn: neither gets a span.
    """
    text = _render(tok, messages, False)
    spans = []
    for i in range(max(first, 1), len(messages)):
        m = messages[i]
        if m["role"] != "assistant" or (_is_blank(m.get("content")) and not m.get("tool_calls")):
            continue
        before, through = _render(tok, messages[:i], True), _render(tok, messages[:i + 1], False)
        if not text.startswith(through):
            raise TokenizerError(f"the chat template renders message {i} differently inside the whole "
                                 "conversation (it rewrites earlier turns): train on one assistant turn per example")
        start = len(os.path.commonprefix([before, through]))
        end = len(through.rstrip())
        if end > start:
            spans.append((start, end))
    return text, spans


def tokenize_chat(tok: Tokenizer, messages: Messages, first: int = 0) -> TokenizedChat:
    """Ids of the rendered conversation; labels on the assistant turns at index >= first only."""
    text, spans = assistant_spans(tok, messages, first)
    enc = tok.backend.encode(text, add_special_tokens=False)
    labels = [IGNORE_INDEX] * len(enc.ids)
    for t, ((begin, _), token_id) in enumerate(zip(enc.offsets, enc.ids)):
        if any(start <= begin < end for start, end in spans):
            labels[t] = token_id
    return TokenizedChat(list(enc.ids), labels)


def truncate(example: TokenizedChat, max_len: int) -> TokenizedChat:
    return TokenizedChat(example.input_ids[:max_len], example.labels[:max_len])


def load_sft_examples(path: str | os.PathLike, tok: Tokenizer, max_len: int) -> list[TokenizedChat]:
    """Every usable example of an SFT jsonl file, truncated to max_len tokens.

    Examples left with no assistant token (an empty answer, or cut off by max_len) are skipped
    with a warning; a file with no usable example at all is an error.
    """
    rows = ((where, lambda m=messages: truncate(tokenize_chat(tok, m), max_len))
            for where, messages in read_conversations(path))
    return collect_usable(path, rows, lambda ex: ex.loss_tokens > 0, "example",
                          "records with a non-empty assistant answer", max_len)


def collect_usable(path: str | os.PathLike, rows: Iterable[tuple[str, Callable[[], T]]],
                   usable: Callable[[T], bool], what: str, needs: str, max_len: int) -> list[T]:
    """Build each row's item (errors name its file:line) and keep the usable ones.

    Unusable items are skipped with one warning; a file with none usable is an error.
    """
    kept, skipped = [], 0
    for where, make in rows:
        try:
            item = make()
        except TokenizerError as e:
            raise ChatDataError(f"{where}: {e}") from None
        if usable(item):
            kept.append(item)
        else:
            skipped += 1
    if skipped and kept:  # with none left, the error below says it all
        log.warning("%s: skipped %d %s(s) with no answer tokens within max_len=%d", path, skipped, what, max_len)
    if not kept:
        raise ChatDataError(f"{path} has no usable {what}: it needs {needs} that start within the first "
                            f"{max_len} tokens")
    return kept


class ExampleOrder:
    """Example indices in a fresh seeded random order each epoch; the position is one integer."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.consumed = n, seed, 0
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def peek(self) -> int:
        epoch, i = divmod(self.consumed, self.n)
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        return int(self._perm[i])

    def next(self) -> int:
        index = self.peek()
        self.consumed += 1
        return index


def pad_rows(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=torch.long)


class SFTBatches:
    """This rank's micro-batches of SFT examples (the training loop's BatchSource).

    All ranks walk the same example order; rank r takes rows r*micro_batch .. of each group of
    world*micro_batch rows. Unpacked rows are single examples right-padded to the longest in
    the batch; packed rows hold consecutive examples up to seq_len tokens.
    """

    def __init__(self, examples: Sequence[TokenizedChat], micro_batch: int, pad_id: int, *,
                 pack: bool = False, seq_len: int | None = None, seed: int = 0,
                 rank: int = 0, world: int = 1) -> None:
        if pack and seq_len is None:
            raise ValueError("packing needs seq_len")
        self.examples, self.micro_batch, self.pad_id = examples, micro_batch, pad_id
        self.pack, self.seq_len, self.rank, self.world = pack, seq_len, rank, world
        self.order = ExampleOrder(len(examples), seed)

    def _row(self) -> list[TokenizedChat]:
        row = [self.examples[self.order.next()]]
        if self.pack:
            used = len(row[0])
            while used + len(self.examples[self.order.peek()]) <= self.seq_len:  # type: ignore[operator]
                row.append(self.examples[self.order.next()])
                used += len(row[-1])
        return row

    def next_batch(self) -> dict[str, torch.Tensor]:
        rows = [self._row() for _ in range(self.world * self.micro_batch)]
        return collate(rows[self.rank * self.micro_batch:(self.rank + 1) * self.micro_batch], self.pad_id)

    def state_dict(self) -> dict:
        return {"consumed": self.order.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.order.consumed = int(state["consumed"])


def collate(rows: Sequence[Sequence[TokenizedChat]], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of one or more examples -> padded input_ids and labels; packed rows add positions and segments."""
    ids = [[t for ex in row for t in ex.input_ids] for row in rows]
    # An example's first token would be "predicted" from the previous example in a packed row.
    labels = [[t for ex in row for t in [IGNORE_INDEX, *ex.labels[1:]]] for row in rows]
    batch = {"input_ids": pad_rows(ids, pad_id), "labels": pad_rows(labels, IGNORE_INDEX)}
    if any(len(row) > 1 for row in rows):
        batch["positions"] = pad_rows([[p for ex in row for p in range(len(ex))] for row in rows], 0)
        batch["segments"] = pad_rows([[s for s, ex in enumerate(row) for _ in range(len(ex))] for row in rows], -1)
    return batch

