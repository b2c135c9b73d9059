"""Calibration data and block-by-block execution for the methods that look at activations.

GPTQ and AWQ need what each linear layer actually sees: calibration text is tokenized into
`n_samples` windows of `seq_len` tokens, embedded once, and pushed through the transformer one
block at a time (`BlockRunner`), so a block's inputs can reflect the already-quantized blocks
before it and memory holds one block's activations, never the whole model's.

Text comes from the bundled corpus (its training documents, never the held-out ones that
perplexity is measured on) or from the user's files:

    ids = calibration_ids(tok, ["bundled"], n_samples=128, seq_len=512)
    runner = BlockRunner(model, ids)
    for layer in model.model.layers:
        ... hooks on layer's linears ...; runner.run(layer); runner.advance(layer)
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch
import torch.nn as nn

from ember.data.shards import VAL_FRACTION, holdout_key
from ember.data.sources import Document, documents, stdlib_sources
from ember.errors import EmberError
from ember.model.transformer import Transformer


class CalibrationError(EmberError):
    """Calibration data that cannot give the requested samples."""


def split_documents(spec: list[str], held_out: bool, code_bytes: int | None = 4_000_000) -> Iterator[Document]:
    """Documents of `spec` ("bundled" and/or paths). For the bundled corpus, only its training
    documents (held_out=False) or only its held-out ones (held_out=True); user files whole."""
    bundled = "bundled" in spec
    if bundled:
        for doc in documents(["bundled"], code_bytes=code_bytes):
            if (holdout_key(doc.text) < VAL_FRACTION) == held_out:
                yield doc
    paths = [s for s in spec if s != "bundled"]
    if paths:
        yield from documents(paths)


def heldout_documents(spec: list[str], code_bytes: int | None = 4_000_000) -> Iterator[Document]:
    """Text no model trained on the bundled corpus has seen, for scoring: the bundled corpus's
    held-out documents, then the standard-library files past its code cap (`code_bytes`), which
    it never contains (several MB: room for 100k+ tokens); user files whole."""
    bundled = "bundled" in spec
    yield from split_documents(["bundled"] if bundled else [], held_out=True, code_bytes=code_bytes)
    if bundled and code_bytes is not None:
        yield from stdlib_sources(max_bytes=code_bytes, after=True)
    paths = [s for s in spec if s != "bundled"]
    if paths:
        yield from documents(paths)


def calibration_ids(tokenizer, data: list[str], n_samples: int = 128, seq_len: int = 512,
                    seed: int = 0) -> torch.Tensor:
    """(n_samples, seq_len) token windows drawn at random from the documents joined by EOS."""
    if n_samples < 1 or seq_len < 2:
        raise CalibrationError(f"need n_samples >= 1 and seq_len >= 2, got {n_samples} and {seq_len}")
    docs = [d.text for d in split_documents(data, held_out=False)]
    rng = random.Random(seed)
    rng.shuffle(docs)
    eos = tokenizer.eos_token_id
    want = 2 * n_samples * seq_len  # enough text that windows rarely overlap
    stream: list[int] = []
    for text in docs:
        stream += tokenizer.encode(text, add_special_tokens=False)
        if eos is not None:
            stream.append(eos)
        if len(stream) >= want:
            break
    if len(stream) <= seq_len:
        raise CalibrationError(f"calibration data {data} holds {len(stream)} tokens; "
                               f"need more than seq_len={seq_len} (use a smaller --calib-seq-len or more text)")
    starts = [rng.randrange(len(stream) - seq_len) for _ in range(n_samples)]
    return torch.tensor([stream[s:s + seq_len] for s in starts], dtype=torch.long)


class BlockRunner:
    """The hidden states entering the current block for every calibration sample.

    `run(block)` returns the block's outputs (without changing the state); `advance(block)`
    replaces the state by them, typically after the block has been quantized.
    """

    def __init__(self, model: Transformer, input_ids: torch.Tensor, batch_size: int = 16) -> None:
        self.batch_size = batch_size
        T = input_ids.shape[1]
        device = next(model.parameters()).device
        with torch.no_grad():  # what the model's forward feeds its first block (Gemma: scaled)
            self.hidden = model.embed(input_ids.to(device)).float()
        self.global_cos_sin, self.local_cos_sin = model.rope(torch.arange(T, device=device).unsqueeze(0), torch.float32)

    def cos_sin(self, block: nn.Module):
        """The RoPE cos/sin `block` rotates with (Gemma 3's sliding layers: their own base)."""
        return self.local_cos_sin if block.self_attn.local_rope else self.global_cos_sin

    @torch.no_grad()
    def run(self, block: nn.Module, hidden: torch.Tensor | None = None) -> torch.Tensor:
        x = self.hidden if hidden is None else hidden
        cos_sin = self.cos_sin(block)
        outs = [block(x[i:i + self.batch_size], cos_sin, None)[0] for i in range(0, len(x), self.batch_size)]
        return torch.cat(outs)

    def advance(self, block: nn.Module) -> None:
        self.hidden = self.run(block)


class InputCapture:
    """Forward pre-hooks that hand every input of the given modules to a callback.

        with InputCapture({"q": q_proj}, lambda name, x: ...): runner.run(layer)
    """

    def __init__(self, modules: dict[str, nn.Module], callback) -> None:
        self.modules, self.callback, self.handles = modules, callback, []

    def __enter__(self) -> "InputCapture":
        for name, module in self.modules.items():
            self.handles.append(module.register_forward_pre_hook(
                lambda _m, args, name=name: self.callback(name, args[0].detach())))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
