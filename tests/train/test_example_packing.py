"""Packed SFT rows compute exactly what their examples compute alone (block-diagonal attention)."""

from __future__ import annotations

import pytest
import torch

from ember.config import preset
from ember.data.sft import SFTBatches, collate, tokenize_chat
from ember.model.transformer import Transformer
from ember.train.sft import sft_loss
from tests.chat_tokenizers import chatml_tokenizer


@pytest.mark.parametrize("overrides", [{}, {"sliding_window": 6}, {"position": "alibi"}])
@torch.no_grad()
def test_packed_rows_equal_examples_alone(overrides) -> None:
    tok = chatml_tokenizer()
    model = Transformer(preset("tiny", vocab_size=tok.vocab_size, **overrides)).eval()
    for name, p in model.named_parameters():
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            p.mul_(8)  # sharp attention: leaking across examples would change the loss visibly
    examples = [tokenize_chat(tok, [{"role": "user", "content": f"Question {i}? " * (1 + i)},
                                    {"role": "assistant", "content": "Answer. " * (2 + i)}]) for i in range(4)]
    packed = SFTBatches(examples, micro_batch=1, pad_id=tok.pad_token_id, pack=True,
                          seq_len=sum(len(e) for e in examples)).next_batch()
    assert int(packed["segments"].max()) == 3  # all four examples in one row
    alone = collate([[e] for e in examples], tok.pad_token_id)
    loss_packed, n_packed = sft_loss(model, packed)
    loss_alone, n_alone = sft_loss(model, alone)
    assert n_packed == n_alone == sum(e.loss_tokens for e in examples)
    assert abs(loss_packed.item() - loss_alone.item()) < 1e-5
    if overrides:  # a 6-token window hides earlier examples from the answers anyway
        return
    leaky = {k: v for k, v in packed.items() if k not in ("segments", "positions")}  # plain causal
    assert abs(sft_loss(model, leaky)[0].item() - loss_alone.item()) > 1e-3
