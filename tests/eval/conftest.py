"""Fixtures for the eval tests: one tiny transformers Llama with an ember tokenizer, saved once
per session, loaded in process (ember) and behind a fake OpenAI-compatible server (transformers)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import ember
from ember.eval.http_backend import OpenAIBackend
from ember.eval.local_backend import LocalBackend
from tests.eval.openai_fake import make_app, serve


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A random Llama (GQA, 2 layers) whose vocabulary is a BPE tokenizer trained on pydoc topics."""
    import transformers
    from pydoc_data.topics import topics

    from ember.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tiny_llama")
    tok = train_tokenizer([topics[k] for k in sorted(topics)[:40]], vocab_size=400, show_progress=False)
    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=512, initializer_range=0.2,
                                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save(out)
    return out


@pytest.fixture(scope="session")
def hf_model(tiny_dir):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tokenizer(tiny_dir):
    return ember.load_tokenizer(tiny_dir)


@pytest.fixture(scope="session")
def local(tiny_dir) -> LocalBackend:
    return LocalBackend.from_dir(tiny_dir, batch_size=4)


@pytest.fixture(scope="session")
def server_url(tiny_dir):
    with serve(make_app(tiny_dir)) as url:
        yield url


@pytest.fixture(scope="session")
def remote(server_url, tokenizer) -> OpenAIBackend:
    return OpenAIBackend(server_url, tokenizer=tokenizer, batch_size=4)
