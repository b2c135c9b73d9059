"""Parallel-engine tests share the engine tests' fixtures: torch on one thread per process (the
workers inherit it), the small pydoc tokenizer and the tiny spread-weight model."""

from tests.engine.conftest import _one_thread, spread_model, tiny, tok  # noqa: F401  (fixtures)
