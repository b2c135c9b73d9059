"""Parallel-engine tests share the engine tests' fixtures: torch on one thread per process (the
workers inherit it), the small pydoc tokenizer and the tiny spread-weight model; and the eval
tests' tiny Llama folder with a tokenizer (tiny_dir), for the CLI and torchrun tests."""

from tests.engine.conftest import _one_thread, spread_model, tiny, tok  # noqa: F401  (fixtures)
from tests.eval.conftest import tiny_dir  # noqa: F401
