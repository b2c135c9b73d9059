"""Grounded answers: retrieved chunks as numbered sources in the prompt, packed into the context budget.

    llm = ember.LLM("runs/quickstart/base", kv_cache_memory=0.5)
    grounded = ground(retriever, [{"role": "user", "content": question}], llm.get_tokenizer(),
                      context_length=llm.engine.max_model_len, max_tokens=256)
    text = generate_text(llm, grounded.messages, max_tokens=256)
    answer = Answer(text, grounded.sources)           # answer.cited: the [n] the model used
    grounded, answer = ask_index(llm, retriever, question, max_tokens=256)   # the three steps in one

The last user message becomes: instructions (answer from the sources, cite them as [1], [2]),
the sources in rank order, each headed `[n] source — heading path`, then the question; earlier
turns pass through unchanged, and the whole goes through the tokenizer's chat template. Sources
are added while the templated prompt stays within context_length - max_tokens tokens; the first
one that does not fit is cut to the room left (if at least MIN_SOURCE_TOKENS) and the rest are
dropped, so the prompt never overflows. `ground` is what a server calls to answer a chat
request from an index and return the sources beside the completion.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ember.engine.llm import LLM
from ember.engine.sampling_params import SamplingParams
from ember.rag.errors import RagError
from ember.rag.retrieve import Retriever, SearchParams
from ember.rag.store import Hit
from ember.tokenizer import Tokenizer

INSTRUCTIONS = ("Answer the question using only the numbered sources below. Cite each source you use by its "
                "number in square brackets, like [1] or [2]. If the sources do not contain the answer, say so.")
MIN_SOURCE_TOKENS = 32
_CITATION = re.compile(r"\[(\d+)\]")


@dataclass
class Source:
    """A numbered source as the model saw it."""

    n: int
    id: str
    source: str
    headings: list[str]
    text: str  # the text given to the model (cut short if `truncated`)
    score: float
    truncated: bool = False

    def label(self) -> str:
        return self.source + (f" — {' > '.join(self.headings)}" if self.headings else "")


@dataclass
class Grounded:
    """Messages ready for the chat template, the sources in them, and the prompt's length in tokens."""

    messages: list[dict[str, Any]]
    sources: list[Source]
    prompt_tokens: int


@dataclass
class Answer:
    text: str
    sources: list[Source]
    cited: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.cited:
            numbers = {int(m) for m in _CITATION.findall(self.text)}
            self.cited = sorted(n for n in numbers if 1 <= n <= len(self.sources))

    def to_dict(self) -> dict[str, Any]:
        return {"answer": self.text, "cited": self.cited, "sources": [asdict(s) for s in self.sources]}


def _question(messages: Sequence[Mapping[str, Any]]) -> str:
    if not messages or messages[-1].get("role") != "user" or not isinstance(messages[-1].get("content"), str):
        raise RagError("grounding needs a conversation that ends with a user message (its text is the query)")
    question = messages[-1]["content"].strip()
    if not question:
        raise RagError("the question is empty: ask something")
    return question


def pack_sources(messages: Sequence[Mapping[str, Any]], hits: Sequence[Hit], tokenizer: Tokenizer,
                 budget: int) -> Grounded:
    """The grounded messages with as many sources as fit in `budget` prompt tokens (module docstring)."""
    question = _question(messages)
    head = [dict(m) for m in messages[:-1]]

    def render(blocks: list[str]) -> tuple[list[dict[str, Any]], int]:
        body = "\n\n".join(blocks) if blocks else "(no sources were found)"
        msgs = head + [{"role": "user", "content": f"{INSTRUCTIONS}\n\nSources:\n{body}\n\nQuestion: {question}"}]
        return msgs, len(tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True))

    msgs, used = render([])
    if used > budget:
        raise RagError(f"the question and instructions alone take {used} tokens, more than the {budget} the model's "
                       "context leaves after the answer budget: shorten the question or lower --max-tokens")
    blocks: list[str] = []
    sources: list[Source] = []
    for hit in hits:
        c = hit.chunk
        src = Source(len(sources) + 1, c.id, c.source, list(c.headings), c.text, hit.score)
        block = f"[{src.n}] {src.label()}\n{c.text}"
        trial, n = render(blocks + [block])
        if n <= budget:
            blocks.append(block)
            sources.append(src)
            msgs, used = trial, n
            continue
        # Cut this source to the room left: the most text tokens that still fit (binary search).
        ids = tokenizer.encode(c.text, add_special_tokens=False)
        lo, hi, best = MIN_SOURCE_TOKENS, len(ids) - 1, None
        while lo <= hi:
            mid = (lo + hi) // 2
            text = tokenizer.decode(ids[:mid]).rstrip() + " …"
            trial, n = render(blocks + [f"[{src.n}] {src.label()}\n{text}"])
            if n <= budget:
                best, lo = (trial, n, text), mid + 1
            else:
                hi = mid - 1
        if best is not None:
            msgs, used, src.text = best
            src.truncated = True
            sources.append(src)
        break
    return Grounded(msgs, sources, used)


def ground(retriever: Retriever, messages: Sequence[Mapping[str, Any]], tokenizer: Tokenizer, *,
           context_length: int, max_tokens: int, params: SearchParams | None = None) -> Grounded:
    """Retrieve for the last user message and pack the sources into its prompt (module docstring)."""
    budget = context_length - max_tokens
    if budget <= 0:
        raise RagError(f"max_tokens {max_tokens} leaves no room for a prompt in a context of {context_length} tokens")
    hits = retriever.search(_question(messages), params or SearchParams())
    return pack_sources(messages, hits, tokenizer, budget)


def ask_index(llm: LLM, retriever: Retriever, question: str, max_tokens: int, *,
              params: SearchParams | None = None, temperature: float = 0.0,
              seed: int | None = None) -> tuple[Grounded, Answer]:
    """One grounded question: retrieve, pack the sources into the prompt, generate; (prompt, answer)."""
    grounded = ground(retriever, [{"role": "user", "content": question}], llm.get_tokenizer(),
                      context_length=llm.engine.max_model_len, max_tokens=max_tokens, params=params)
    text = generate_text(llm, grounded.messages, max_tokens, temperature=temperature, seed=seed)
    return grounded, Answer(text, grounded.sources)


def generate_text(llm: LLM, messages: Sequence[Mapping[str, Any]], max_tokens: int, temperature: float = 0.0,
                  top_p: float = 1.0, seed: int | None = None) -> str:
    """The one place answers are generated: the serving engine (`ember.LLM`), through the chat template."""
    params = SamplingParams(temperature=temperature, top_p=top_p, seed=seed, max_tokens=max_tokens)
    return llm.chat(list(messages), params)[0].outputs[0].text.strip()
