"""Grounded prompts: numbered sources in rank order through the chat template, packed into the
context budget without ever overflowing it, citations read back from the answer."""

from __future__ import annotations

import pytest
import torch

from conftest import CONTEXT
from ember.checkpoint.hf import load_model
from ember.engine.llm import LLM
from ember.model.generate import generate, stop_token_ids
from ember.rag.answer import MIN_SOURCE_TOKENS, Answer, Source, generate_text, ground, pack_sources
from ember.rag.chunking import Chunk, chunk_id
from ember.rag.errors import RagError
from ember.rag.index import Index
from ember.rag.ingestion import ingest
from ember.rag.store import Hit
from ember.tokenizer import load_tokenizer


def hits(n: int, words: int = 60) -> list[Hit]:
    out = []
    for i in range(n):
        text = " ".join(f"fact{i} word{j}" for j in range(words))
        out.append(Hit(Chunk(chunk_id(f"doc{i}.md", str(i)), f"doc{i}.md", 0, 0, len(text), ("Guide", f"Part {i}"),
                             text, "h"), score=1.0 / (i + 1)))
    return out


def prompt_len(tok, grounded) -> int:
    return len(tok.apply_chat_template(grounded.messages, add_generation_prompt=True, tokenize=True))


def test_sources_are_numbered_in_rank_order_through_the_template(chat_model_dir) -> None:
    tok = load_tokenizer(chat_model_dir)
    g = pack_sources([{"role": "user", "content": "What is fact0?"}], hits(2, words=5), tok, budget=10_000)
    assert [s.n for s in g.sources] == [1, 2] and not any(s.truncated for s in g.sources)
    content = g.messages[-1]["content"]
    assert content.index("[1] doc0.md — Guide > Part 0\nfact0 word0") < content.index("[2] doc1.md — Guide > Part 1")
    assert content.rstrip().endswith("Question: What is fact0?") and "[1] or [2]" in content
    prompt = tok.apply_chat_template(g.messages, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>user\n") and prompt.endswith("<|im_start|>assistant\n")
    assert g.prompt_tokens == prompt_len(tok, g)


@pytest.mark.parametrize("budget", [140, 200, 260, 333, 480, 700])
def test_packing_fills_the_budget_and_never_overflows(chat_model_dir, budget) -> None:
    tok = load_tokenizer(chat_model_dir)
    many = hits(8, words=15)
    g = pack_sources([{"role": "user", "content": "Tell me about fact3."}], many, tok, budget)
    assert g.prompt_tokens == prompt_len(tok, g) <= budget
    whole = [s for s in g.sources if not s.truncated]
    assert [s.id for s in g.sources] == [h.chunk.id for h in many[:len(g.sources)]]
    assert all(s.truncated for s in g.sources[len(whole):])
    if budget >= 200:  # room for at least a cut source: the last one is cut, and says so
        assert g.sources[-1].truncated and g.sources[-1].text.endswith(" …")
        assert g.sources[-1].text[:-2] in many[len(g.sources) - 1].chunk.text
    # Packing stops only when less room is left than a source header plus MIN_SOURCE_TOKENS of text.
    assert budget - g.prompt_tokens < MIN_SOURCE_TOKENS + 20


def test_a_prompt_that_cannot_fit_is_an_error(chat_model_dir) -> None:
    tok = load_tokenizer(chat_model_dir)
    with pytest.raises(RagError, match="shorten the question"):
        pack_sources([{"role": "user", "content": "why " * 200}], hits(1), tok, budget=100)
    with pytest.raises(RagError, match="ends with a user message"):
        pack_sources([{"role": "assistant", "content": "hi"}], hits(1), tok, budget=1000)


def test_earlier_turns_pass_through(chat_model_dir) -> None:
    tok = load_tokenizer(chat_model_dir)
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
             {"role": "assistant", "content": "hello"}, {"role": "user", "content": "What is fact1?"}]
    g = pack_sources(turns, hits(2, words=5), tok, budget=10_000)
    assert g.messages[:3] == turns[:3] and "Question: What is fact1?" in g.messages[3]["content"]


def test_citations_are_read_from_the_answer() -> None:
    sources = [Source(n, f"id{n}", f"s{n}", [], "t", 1.0) for n in (1, 2, 3)]
    assert Answer("As [2] says, and [1]; not [7].", sources).cited == [1, 2]
    assert Answer("no citations", sources).to_dict()["cited"] == []


def test_ground_and_generate_stay_inside_the_context(chat_model_dir, tiny_embedder, tmp_path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(6):
        (docs / f"d{i}.txt").write_text(" ".join(f"topic{i} sentence {j}." for j in range(40)))
    llm = LLM(chat_model_dir, max_num_seqs=1, kv_cache_memory=0.05)
    tok = llm.get_tokenizer()
    assert llm.engine.max_model_len == CONTEXT
    with Index.open(tmp_path / "idx", create=True, embedder=tiny_embedder) as idx:
        ingest(idx, [docs], progress=False)
        retrieved = idx.retriever().search("topic3 sentence", k=5)
        g = ground(idx.retriever(), [{"role": "user", "content": "topic3 sentence"}], tok,
                   context_length=CONTEXT, max_tokens=300)
        with pytest.raises(RagError, match="leaves no room"):
            ground(idx.retriever(), [{"role": "user", "content": "x"}], tok, context_length=64, max_tokens=64)
    assert [s.id for s in g.sources] == [h.chunk.id for h in retrieved[:len(g.sources)]]
    assert 1 <= len(g.sources) < 5 and g.prompt_tokens <= CONTEXT - 300
    # The engine answers exactly what the naive reference decoder does (greedy), prompt + answer in context.
    text = generate_text(llm, g.messages, max_tokens=300)
    ids = tok.apply_chat_template(g.messages, add_generation_prompt=True, tokenize=True)
    model = load_model(chat_model_dir)
    eos = stop_token_ids(model.config, tok.eos_token_id)
    out = generate(model, torch.tensor([ids]), 300, eos_token_ids=eos)[0, len(ids):].tolist()
    assert len(out) > 10 and text == tok.decode([t for t in out if t not in eos], skip_special_tokens=True).strip()
