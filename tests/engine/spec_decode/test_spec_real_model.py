"""Speculative decoding on the real model (SmolLM2-135M Q4_1 blocks, native kernels): greedy
replies identical to the plain engine's, with prompt lookup and with a draft model (the same
GGUF by its known name, so every greedy draft should be accepted)."""

from __future__ import annotations

import pytest

from ember.engine import LLM, SamplingParams

DOC = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
       "after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889.")
CODE = "def area(r):\n    result = 3.14159 * r * r\n    return result\n"
QUESTIONS = [f"Repeat this text exactly:\n\n{DOC}",
             f"{DOC}\n\nWho designed the Eiffel Tower, and when was it built?",
             f"Rename the variable result to value in this code:\n\n{CODE}",
             f"Add a docstring to this function:\n\n{CODE}",
             "Write a haiku about autumn.",
             "What is the capital of Japan?"]


@pytest.fixture(scope="module")
def plain(smollm2_file):
    return LLM(smollm2_file, kv_cache_memory=0.25)


def _chats(llm: LLM, questions: list[str], tokens: int) -> list[list[int]]:
    outs = llm.chat([[{"role": "user", "content": q}] for q in questions],
                    SamplingParams(temperature=0, max_tokens=tokens))
    return [o.outputs[0].token_ids for o in outs]


def test_prompt_lookup_replies_are_the_plain_engines(plain) -> None:
    spec = LLM(plain.engine.model, plain.get_tokenizer(), kv_cache_memory=0.25,
               speculative_config={"method": "ngram", "num_speculative_tokens": 4})
    assert _chats(spec, QUESTIONS, 48) == _chats(plain, QUESTIONS, 48)
    s = spec.engine.stats()
    assert s.spec_decode_num_accepted_tokens > 0.3 * s.spec_decode_num_draft_tokens > 0  # it copies from its input


def test_draft_model_replies_are_the_plain_engines(plain) -> None:
    spec = LLM(plain.engine.model, plain.get_tokenizer(), kv_cache_memory=0.25,
               speculative_config={"method": "draft_model", "model": "smollm2-135m-instruct",
                                   "num_speculative_tokens": 3})
    assert _chats(spec, QUESTIONS[:2], 24) == _chats(plain, QUESTIONS[:2], 24)
    s = spec.engine.stats()
    assert s.spec_decode_num_accepted_tokens > 0.9 * s.spec_decode_num_draft_tokens > 0
