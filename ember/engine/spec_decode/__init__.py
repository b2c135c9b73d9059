"""Speculative decoding: cheap drafts of the next k tokens, verified by one target forward.

    config.py     SpeculativeConfig: vLLM's --speculative-config JSON, checked field by field
    ngram.py      NgramProposer: prompt lookup (copy what followed an earlier match of the tail)
    draft_model.py DraftModelProposer: a smaller model with the same vocabulary drafts greedily
                  or by sampling, each request with its own contiguous draft KV cache
    rejection.py  rejection sampling that keeps the target's distribution exactly
    verify.py     SpecDecoder: what the engine calls (propose before scheduling, verify after the
                  forward, roll back the KV of rejected drafts, count the metrics)
"""

from ember.engine.spec_decode.config import SpeculativeConfig, SpeculativeConfigError

__all__ = ["SpeculativeConfig", "SpeculativeConfigError"]
