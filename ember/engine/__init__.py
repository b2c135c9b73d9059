"""ember.engine: the serving engine (paged KV cache, continuous batching, prefix caching, sampling).

    from ember.engine import LLM, SamplingParams              # offline
    from ember.engine import AsyncLLMEngine, EngineConfig     # streaming, for the HTTP server
    from ember.engine import StructuredOutputsParams          # constrained decoding (json, regex, ...)
"""

from ember.engine.async_engine import AsyncLLMEngine
from ember.engine.config import EngineConfig, EngineConfigError
from ember.engine.engine import EngineStats, LLMEngine, RequestError
from ember.engine.llm import LLM
from ember.engine.lora_request import LoRARequest, LoRARequestError
from ember.engine.request import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from ember.engine.sampling_params import SamplingParams, SamplingParamsError
from ember.engine.structured_outputs import StructuredOutputsParams

__all__ = [
    "AsyncLLMEngine", "CompletionOutput", "EngineConfig", "EngineConfigError", "EngineStats", "LLM", "LLMEngine",
    "Logprob", "LoRARequest", "LoRARequestError", "RequestError", "RequestMetrics", "RequestOutput", "SamplingParams", "SamplingParamsError",
    "StructuredOutputsParams",
]
