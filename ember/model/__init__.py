"""ember's one model: the Transformer, its attention backends, position encodings and naive generate."""

from ember.model.generate import KVCache, generate
from ember.model.transformer import Transformer

__all__ = ["KVCache", "Transformer", "generate"]
