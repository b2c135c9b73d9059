"""ember: one package for the whole life of a decoder-only language model.

    import ember
    model = ember.load_model("path/to/hf_dir")        # nn.Module: (B, T) ids -> (B, T, vocab) logits
    tok = ember.load_tokenizer("path/to/hf_dir")
    ember.save_model(model, "out_dir")                # Hugging Face layout
    llm = ember.LLM("path/to/hf_dir")                 # the serving engine, vLLM-shaped
    llm.generate(["Hello"], ember.SamplingParams(temperature=0, max_tokens=32))

See docs/architecture.md for the map and README.md for every CLI verb.
"""

from ember.checkpoint.hf import CheckpointError, load_model, save_model
from ember.config import ConfigError, ModelConfig, preset
from ember.engine import LLM, LoRARequest, SamplingParams, StructuredOutputsParams
from ember.errors import EmberError
from ember.model.generate import generate
from ember.model.transformer import Transformer
from ember.tokenizer import Tokenizer, TokenizerError, load_tokenizer

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfigError", "EmberError", "LLM", "LoRARequest", "ModelConfig", "SamplingParams",
    "StructuredOutputsParams",
    "Tokenizer", "TokenizerError", "Transformer", "generate", "load_model", "load_tokenizer", "preset", "save_model",
]
