"""The OpenAI server on a tiny Falcon and a tiny Gemma 3 (random weights made by transformers, a BPE
vocabulary trained here), asked through the official `openai` client: /v1/completions and
/v1/chat/completions return transformers' greedy continuation of the prompt, and the chat prompt is
the model's template as transformers renders it (Gemma's for Gemma 3, whose <end_of_turn> is a stop id)."""

from __future__ import annotations

import openai
import pytest
import torch

import ember
from ember.serve import running
from ember.tokenizer import train_tokenizer
from ember.tokenizer.gguf import GEMMA_CHAT_TEMPLATE
from tests.hf_models import make_hf_model
from tests.serve.conftest import make_app

GEMMA_SPECIALS = ["<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"]
MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is a tuple?"}]


@pytest.fixture(scope="module", params=["falcon-new-arch-gqa", "gemma3-mqa-softcap"])
def served(request, tmp_path_factory):
    """(family, folder, transformers model, openai client) for one tiny model served by ember."""
    from pydoc_data.topics import topics

    family, out = request.param, tmp_path_factory.mktemp(request.param)
    texts = [topics[k] for k in sorted(topics)[:40]]
    if family.startswith("gemma"):  # Gemma's turn markers as special tokens, Gemma's template
        tok = train_tokenizer(texts, vocab_size=400, special_tokens=GEMMA_SPECIALS, chat_template=GEMMA_CHAT_TEMPLATE,
                              show_progress=False)
        eos = [tok.eos_token_id, tok.encode("<end_of_turn>", add_special_tokens=False)[0]]
    else:
        tok = train_tokenizer(texts, vocab_size=400, show_progress=False)
        eos = tok.eos_token_id
    hf = make_hf_model(family, out, vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id, eos_token_id=eos,
                       pad_token_id=tok.pad_token_id)
    tok.save(out)
    with running(make_app(out, served_model_name="tiny", max_num_seqs=4)) as url:
        yield family, out, hf, openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _hf_greedy(hf, ids: list[int], new: int) -> list[int]:
    """transformers' greedy continuation, stopping where its generation config says (EOS ids)."""
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=new, do_sample=False)
    return out[0, len(ids):].tolist()


def test_completions_are_transformers_greedy(served) -> None:
    _, folder, hf, client = served
    tok = ember.load_tokenizer(folder)
    prompt = "def fib(n):"
    want = _hf_greedy(hf, tok.encode(prompt), 16)
    got = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0)
    assert got.choices[0].text == tok.decode(want, skip_special_tokens=True)
    assert got.usage.completion_tokens == len(want)


def test_chat_uses_the_models_template(served) -> None:
    import transformers

    family, folder, hf, client = served
    ids = transformers.AutoTokenizer.from_pretrained(folder).apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    text = transformers.AutoTokenizer.from_pretrained(folder).apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=False)
    if family.startswith("gemma"):
        assert text == "<eos><start_of_turn>user\nAnswer briefly.\n\nWhat is a tuple?<end_of_turn>\n<start_of_turn>model\n"
        end_of_turn = ember.load_tokenizer(folder).encode("<end_of_turn>", add_special_tokens=False)
        assert len(end_of_turn) == 1 and end_of_turn[0] in ember.load_model(folder).config.eos_token_id
    want = _hf_greedy(hf, ids, 24)
    got = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=24, temperature=0)
    assert got.usage.prompt_tokens == len(ids)
    assert got.choices[0].message.content == ember.load_tokenizer(folder).decode(want, skip_special_tokens=True)
    stopped = len(want) < 24  # transformers stopped on an EOS id: ember's finish_reason says so too
    assert got.choices[0].finish_reason == ("stop" if stopped else "length")
