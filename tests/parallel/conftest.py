"""Parallel-engine tests run torch on one thread per process (the workers inherit it)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tok():
    """A small byte-level BPE tokenizer trained on the bundled Python documentation."""
    import pydoc_data.topics

    from ember.tokenizer import train_tokenizer

    texts = list(pydoc_data.topics.topics.values())[:300] + ["Grüße aus München! 東京 🙂"] * 20
    return train_tokenizer(texts, vocab_size=600, show_progress=False)


def spread_model(cfg, seed: int = 0):
    """A random Transformer with wide logits, so greedy choices are not decided by rounding."""
    from ember.model.transformer import Transformer

    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    for p in model.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.2)
    return model


@pytest.fixture(scope="session")
def tiny(tok):
    """(model, tokenizer): the tiny preset sized to the tokenizer; EOS is <|endoftext|>."""
    from ember.config import preset

    return spread_model(preset("tiny", vocab_size=tok.vocab_size, eos_token_id=(tok.eos_token_id,))), tok


from tests.eval.conftest import tiny_dir  # noqa: E402,F401  (a tiny Llama folder with a tokenizer)
