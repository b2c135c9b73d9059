"""The quantization report's held-out set (clamped to what the text holds) and its per-window
scores, bootstrap standard errors and their place in the table and in `ember quantize`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import ember
from ember.commands.quantize import QuantizeConfig, main
from ember.config import preset
from ember.eval.perplexity import model_perplexity
from ember.model.transformer import Transformer
from ember.quant.report import (
    format_table,
    heldout_line,
    heldout_set,
    measure,
    score_windows,
)
from ember.tokenizer import train_tokenizer


class WordTokenizer:
    """One token per whitespace-separated word (ids modulo a small vocabulary); BOS 1."""

    bos_token_id, eos_token_id = 1, None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [2 + sum(map(ord, w)) % 250 for w in text.split()]


def write_docs(folder: Path, words: list[int]) -> Path:
    folder.mkdir()
    for i, n in enumerate(words):
        (folder / f"doc{i}.txt").write_text(" ".join(f"w{i}x{j % 37}" for j in range(n)) + "\n")
    return folder


def test_heldout_set_stops_near_the_request_and_clamps_to_what_the_text_holds(tmp_path) -> None:
    data = [str(write_docs(tmp_path / "docs", [300, 200, 100]))]
    tok = WordTokenizer()
    some = heldout_set(tok, data, 250)
    assert len(some.texts) == 1 and some.tokens == 300 and not some.short and some.note(data) is None
    everything = heldout_set(tok, data, 10_000)
    assert len(everything.texts) == 3 and everything.tokens == 600 and everything.short
    note = everything.note(data)
    assert note is not None and "600 tokens in 3 documents" in note and "--eval-tokens 10,000" in note


@pytest.fixture(scope="module")
def tiny() -> Transformer:
    torch.manual_seed(0)
    return Transformer(preset("tiny", vocab_size=256)).eval()


def test_window_scores_add_up_to_model_perplexity(tiny, tmp_path) -> None:
    texts = [" ".join(f"a{j % 11}" for j in range(n)) for n in (50, 130, 7)]
    tok = WordTokenizer()
    result, windows = score_windows(tiny, tok, texts, max_len=32)
    ref = model_perplexity(tiny, tok, texts, max_len=32)
    assert result.token_perplexity == ref.token_perplexity and result.documents == 3
    assert windows.tokens.sum() == 187 and len(windows.tokens) == 2 + 5 + 1  # ceil(n / 32) windows each
    assert windows.loglikelihood.sum() == pytest.approx(ref.loglikelihood)


def test_measure_reports_stderrs_and_pairs_the_delta_with_the_baseline(tiny) -> None:
    texts = [" ".join(f"b{(j * 7) % 13}" for j in range(400))]
    tok = WordTokenizer()
    base = measure(tiny, tok, texts, "fp32", max_len=32, decode_tokens=0)
    same = measure(tiny, tok, texts, "copy", max_len=32, decode_tokens=0, baseline=base)
    assert base.perplexity_se is not None and base.perplexity_se > 0
    assert same.delta_pct == 0 and same.delta_se == 0  # paired windows: identical models, no spread
    table = format_table([base, same])
    assert "±" in table.splitlines()[2] and table.splitlines()[3].split()[6] == "+0.000±0.000%"
    assert "400 tokens in 1 documents, 13 windows" in heldout_line([base, same])


@pytest.mark.slow
def test_quantize_cli_clamps_eval_tokens_with_a_note(tmp_path, capsys) -> None:
    from ember.data.sources import pydoc_topics

    tok = train_tokenizer((d.text for d in list(pydoc_topics())[:40]), vocab_size=512, show_progress=False)
    folder = tmp_path / "tiny"
    torch.manual_seed(0)
    ember.save_model(Transformer(preset("tiny", vocab_size=tok.vocab_size, eos_token_id=tok.eos_token_id)), folder)
    tok.save(folder)
    data = write_docs(tmp_path / "heldout", [120, 80])
    main(QuantizeConfig(model=folder, out=tmp_path / "q", method="int8", eval_data=[str(data)],
                        eval_seq_len=64, decode_tokens=0))  # eval_tokens: the default, far above 200 words
    out = capsys.readouterr().out
    assert QuantizeConfig.__dataclass_fields__["eval_tokens"].default == 100_000
    assert "note: the held-out text of" in out and "fewer than --eval-tokens 100,000: all of it is scored" in out
    assert "bootstrap standard error over windows" in out
    int8 = next(line for line in out.splitlines() if line.startswith("int8"))
    assert "±" in int8.split()[6] and int8.split()[6].endswith("%")


def test_bundled_heldout_reaches_100k_tokens_of_text_the_corpus_never_trains_on() -> None:
    """The bundled held-out set: the split's held-out documents, then stdlib code past the
    corpus's code cap; none of it is a training document of the bundled corpus."""
    from ember.data.sources import stdlib_sources
    from ember.quant.calibration import heldout_documents, split_documents

    docs = []
    words = 0
    for doc in heldout_documents(["bundled"]):
        docs.append(doc)
        words += len(doc.text.split())
        if words >= 100_000:  # whitespace words: fewer than tokens
            break
    assert words >= 100_000
    names = [d.source for d in docs]
    assert len(set(names)) == len(names)
    training = {d.source for d in split_documents(["bundled"], held_out=False)}
    assert not training.intersection(names)
    capped = {d.source for d in stdlib_sources(max_bytes=4_000_000)}
    past = [d.source for d in stdlib_sources(max_bytes=4_000_000, after=True)]
    assert past and not capped.intersection(past)
