"""ember's GGUF export of SmolLM2-135M-Instruct read by llama.cpp itself (`llama-simple`).

The f32 export must make llama.cpp continue 8 prompts greedily to exactly ember's text. The
quantized exports must load there and produce text; for q8_0 the agreement with ember's greedy
on the same file is counted and printed, not asserted: llama.cpp multiplies Q8_0 weights by
8-bit-quantized activations while ember dequantizes to fp32, so near-ties may flip.
Skipped where llama.cpp's binary cannot run (tests/outside_tools.py) or SmolLM2 is not installed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ember
from ember.quant.gguf import export_gguf
from tests.outside_tools import outside_tool

pytest.importorskip("gguf")

N_PREDICT = 32
# Plain English with ASCII digits and a ChatML turn: for these, llama.cpp's "smollm"
# pre-tokenizer and ember's (transformers') GPT-2 split give the same ids.
PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):\n",
    "The three primary colors are",
    "In 1969, Neil Armstrong",
    "Water boils at 100 degrees Celsius because",
    "My favourite recipe for a quick dinner is",
    "<|im_start|>user\nWhat is 12 times 7?<|im_end|>\n<|im_start|>assistant\n",
)


def llama_simple(model: Path, prompt: str) -> tuple[str, set[int]]:
    """llama.cpp's greedy output (prompt + continuation, as it prints it) and its end-of-generation ids."""
    proc = subprocess.run([str(outside_tool("llama.cpp", "llama-simple")), "-m", str(model), "-n", str(N_PREDICT),
                           prompt], capture_output=True, timeout=300, check=False)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 0, f"llama-simple failed on {model.name}:\n{err[-3000:]}"
    eog = {int(i) for i in re.findall(r"EOG token\s+=\s+(\d+)", err)}
    assert eog, "llama-simple's log names no end-of-generation token"
    out = proc.stdout.decode("utf-8", "replace")
    assert out.endswith("\n")
    return out[:-1], eog


def ember_greedy(model: ember.Transformer, tok: ember.Tokenizer, prompt: str, eog: set[int]) -> str:
    """Prompt + ember's greedy continuation, cut where llama.cpp stops (it prints no EOG token)."""
    ids = tok.encode(prompt)  # BOS only if the tokenizer adds one; the export's add_bos_token says the same
    threads = torch.get_num_threads()
    # One thread: beside llama.cpp on a busy 2-core machine, two spinning torch threads made
    # 32 tokens take a minute instead of 3 s.
    torch.set_num_threads(1)
    try:
        new = ember.generate(model, torch.tensor([ids]), N_PREDICT)[0, len(ids):].tolist()
    finally:
        torch.set_num_threads(threads)
    stop = next((i for i, t in enumerate(new) if t in eog), len(new))
    return tok.decode(ids + new[:stop])


@pytest.fixture(scope="module")
def llama_cpp() -> Path:
    return outside_tool("llama.cpp", "llama-simple")


@pytest.fixture(scope="module")
def tok(smollm2_file) -> ember.Tokenizer:
    return ember.load_tokenizer(smollm2_file)


@pytest.fixture(scope="module")
def f32_file(llama_cpp, smollm2, tok, tmp_path_factory):
    path = export_gguf(smollm2, tok, tmp_path_factory.mktemp("gguf") / "smollm2-f32.gguf", "f32")
    yield path
    path.unlink(missing_ok=True)  # 540 MB


@pytest.mark.slow
def test_llama_cpp_continues_8_prompts_exactly_as_ember_from_the_f32_export(f32_file, smollm2, tok) -> None:
    for prompt in PROMPTS:
        theirs, eog = llama_simple(f32_file, prompt)
        ours = ember_greedy(smollm2, tok, prompt, eog)
        assert theirs == ours, f"prompt {prompt!r}\nllama.cpp: {theirs!r}\nember:     {ours!r}"
        assert len(theirs) > len(prompt)


@pytest.mark.slow
def test_export_carries_smollm2s_tokenizer_metadata(f32_file, smollm2_file) -> None:
    import gguf

    src = {k: f.contents() for k, f in gguf.GGUFReader(smollm2_file).fields.items()}
    out = {k: f.contents() for k, f in gguf.GGUFReader(f32_file).fields.items()}
    for key in ("tokenizer.ggml.pre", "tokenizer.ggml.add_bos_token", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.unknown_token_id",
                "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.chat_template", "llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon",
                "llama.context_length", "llama.attention.head_count_kv"):
        assert out[key] == src[key], key
    assert out["tokenizer.ggml.pre"] == "smollm"  # llama.cpp splits digits apart for SmolLM, as it was trained
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(f32_file).tensors}  # tied: token_embd reused


@pytest.mark.slow
def test_q8_0_export_runs_in_llama_cpp_and_is_compared_with_ember(llama_cpp, smollm2, tok, tmp_path) -> None:
    path = export_gguf(smollm2, tok, tmp_path / "smollm2-q8_0.gguf", "q8_0")
    reloaded = ember.load_model(path)
    shared = []  # characters of continuation the two agree on before they part
    for prompt in PROMPTS:
        theirs, eog = llama_simple(path, prompt)
        assert theirs.startswith(prompt) and len(theirs) > len(prompt)
        ours = ember_greedy(reloaded, tok, prompt, eog)
        shared.append(len(os.path.commonprefix([theirs, ours])) - len(prompt) if theirs != ours else -1)
    agree = shared.count(-1)
    print(f"\nq8_0: llama.cpp and ember agree on {agree} of {len(PROMPTS)} greedy continuations; "
          f"the others part after {[n for n in shared if n >= 0]} characters")


@pytest.mark.slow
def test_f16_export_runs_in_llama_cpp(llama_cpp, smollm2, tok, tmp_path) -> None:
    path = export_gguf(smollm2, tok, tmp_path / "smollm2-f16.gguf", "f16")
    theirs, _ = llama_simple(path, PROMPTS[0])
    assert theirs.startswith(PROMPTS[0]) and len(theirs) > len(PROMPTS[0])


@pytest.mark.slow
def test_cli_exports_the_gguf_model_as_q4_0_and_llama_cpp_runs_it(llama_cpp, smollm2_file, tmp_path) -> None:
    out = tmp_path / "smollm2-q4_0.gguf"
    proc = subprocess.run([sys.executable, "-m", "ember", "export", "--format", "gguf", "--type", "q4_0",
                           "--model", str(smollm2_file), "--out", str(out)], capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    theirs, _ = llama_simple(out, PROMPTS[0])
    assert theirs.startswith(PROMPTS[0]) and len(theirs) > len(PROMPTS[0])
