"""EngineConfig: the serving engine's knobs (vLLM's names), and sizing the KV block pool.

    EngineConfig(max_num_seqs=64, kv_cache_memory=2.0, enable_prefix_caching=True)

The pool stores `kv_cache_dtype` elements (default: the model's dtype; float16 or bfloat16 halve
an fp32 model's cache and the bytes decode attention reads, rounding K and V to 11 or 8
significant bits). It gets `kv_cache_memory` GiB on a CPU, or `gpu_memory_utilization` of the device memory
still free after the weights are loaded on a GPU (or exactly `num_kv_blocks`, for tests).
`kv_offload_gb` adds a second tier behind the pool (ember/engine/kv_offload.py).
`ember serve` and `LLM(...)` both take these fields.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ember.config import ModelConfig
from ember.errors import EmberError

log = logging.getLogger("ember.engine")

GiB = 1024 ** 3
# kv_cache_dtype values (vLLM's spelling); "auto" stores the model's own dtype.
KV_CACHE_DTYPES: dict[str, torch.dtype | None] = {
    "auto": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class EngineConfigError(EmberError):
    """An engine setting out of range, or a KV budget too small for one block."""


@dataclass
class EngineConfig:
    """Paged KV cache and scheduler settings of the serving engine."""

    block_size: int = field(default=16, metadata={"help": "tokens per KV cache block"})
    kv_cache_memory: float = field(default=2.0, metadata={"help": "GiB for the KV cache on a CPU"})
    gpu_memory_utilization: float = field(
        default=0.9, metadata={"help": "fraction of free GPU memory (after the weights) for the KV cache"})
    num_kv_blocks: int | None = field(default=None, metadata={"help": "exact number of KV blocks (overrides memory)"})
    max_num_seqs: int = field(default=64, metadata={"help": "most sequences decoded together per step"})
    max_num_batched_tokens: int = field(
        default=2048, metadata={"help": "token budget of one step (the prefill chunk size; vLLM's CPU default)"})
    max_model_len: int | None = field(
        default=None, metadata={"help": "longest prompt + output (default: the model's context)"})
    enable_prefix_caching: bool = field(default=True, metadata={"help": "share KV blocks of identical prefixes"})
    enable_chunked_prefill: bool = field(
        default=True, metadata={"help": "split long prompts across steps, batched with decodes"})
    seed: int = field(default=0, metadata={"help": "seed of the sampler for unseeded requests"})
    kv_cache_dtype: str = field(
        default="auto", metadata={"help": "KV cache element type: auto (the model's), float32, float16 or bfloat16"})
    kv_offload_gb: float = field(default=0.0, metadata={
        "help": "GiB of a second KV tier (0 = off): prefix blocks evicted from the pool and preempted "
                "sequences are copied there and restored instead of recomputed; an mmap'd file on a CPU, "
                "pinned host memory on a GPU"})
    kv_offload_dir: str | None = field(default=None, metadata={
        "help": "directory of the offload tier's file (default: a temporary one; the file is unlinked once mapped)"})
    int8_activations: bool = field(default=False, metadata={
        "help": "quantized weights at batch-1 decode: round activations to int8 per 32 values and multiply in "
                "integers, as llama.cpp does (faster; logits move by ~1e-3 relative), instead of fp32"})
    tensor_parallel_size: int = field(default=1, metadata={
        "help": "processes (ranks) the model is split across, Megatron-style (ember/parallel); ember spawns "
                "them, or under torchrun joins the ones started"})
    pipeline_parallel_size: int = field(default=1, metadata={
        "help": "pipeline stages (contiguous layer ranges, each on tensor_parallel_size ranks); micro-batches "
                "of each step keep the stages busy together"})
    enable_expert_parallel: bool = field(default=False, metadata={
        "help": "MoE models: split whole experts across the tensor-parallel ranks instead of each expert"})
    distributed_timeout: float = field(default=120.0, metadata={
        "help": "seconds a parallel collective may wait for a rank before the engine fails"})

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise EngineConfigError(f"invalid engine config: {msg}")

        need(self.block_size >= 1, f"block_size must be >= 1, got {self.block_size}")
        need(self.kv_cache_memory > 0, f"kv_cache_memory must be > 0 GiB, got {self.kv_cache_memory}")
        need(0 < self.gpu_memory_utilization <= 1,
             f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        need(self.num_kv_blocks is None or self.num_kv_blocks >= 1, "num_kv_blocks must be >= 1")
        need(self.max_num_seqs >= 1, f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        need(self.max_num_batched_tokens >= self.max_num_seqs,
             f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
             f"({self.max_num_seqs}) so every running sequence can decode each step")
        need(self.max_model_len is None or self.max_model_len >= 2, "max_model_len must be >= 2")
        need(self.kv_offload_gb >= 0, f"kv_offload_gb must be >= 0 GiB, got {self.kv_offload_gb}")
        need(self.kv_offload_dir is None or self.kv_offload_gb > 0,
             "kv_offload_dir is set but kv_offload_gb is 0: give the tier a size with --kv-offload-gb")
        need(self.tensor_parallel_size >= 1, f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        need(self.pipeline_parallel_size >= 1,
             f"pipeline_parallel_size must be >= 1, got {self.pipeline_parallel_size}")
        need(not self.enable_expert_parallel or self.tensor_parallel_size > 1,
             "enable_expert_parallel splits experts across tensor-parallel ranks: set tensor_parallel_size > 1")
        need(self.distributed_timeout > 0, f"distributed_timeout must be > 0 s, got {self.distributed_timeout}")
        need(self.kv_offload_gb == 0 or (self.tensor_parallel_size == 1 and self.pipeline_parallel_size == 1),
             "kv_offload_gb with tensor or pipeline parallel is not supported: the tier copies one "
             "process's KV pool, and each rank holds its own")
        need(self.kv_cache_dtype in KV_CACHE_DTYPES,
             f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")

    @property
    def world_size(self) -> int:
        """Processes of the engine: tensor_parallel_size x pipeline_parallel_size."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def cache_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The KV pool's element type for a model computing in `model_dtype`."""
        return KV_CACHE_DTYPES[self.kv_cache_dtype] or model_dtype


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers (a tied embedding counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def num_kv_blocks(cfg: EngineConfig, model_cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> int:
    """How many blocks the pool gets (see the module docstring)."""
    if cfg.num_kv_blocks is not None:
        return cfg.num_kv_blocks
    block_bytes = cfg.block_size * model_cfg.kv_bytes_per_token(torch.empty((), dtype=dtype).element_size())
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = free * cfg.gpu_memory_utilization
        source = f"{cfg.gpu_memory_utilization:.0%} of {free / GiB:.1f} GiB free on {device}"
    else:
        budget = cfg.kv_cache_memory * GiB
        source = f"kv_cache_memory={cfg.kv_cache_memory} GiB"
    blocks = int(budget // block_bytes)
    if blocks < 1:
        raise EngineConfigError(f"the KV cache budget ({source}) is smaller than one block of "
                                f"{block_bytes / 2**20:.2f} MiB: raise it")
    return blocks


def log_capacity(model: torch.nn.Module, blocks: int, block_size: int, max_model_len: int,
                 kv_bytes: int, kv_dtype: torch.dtype) -> None:
    tokens = blocks * block_size
    log.info("weights %.1f MiB; KV cache (%s) %.2f GiB = %d blocks x %d tokens = %d tokens; "
             "max concurrent full-length (%d-token) requests: %.1f",
             weight_bytes(model) / 2**20, str(kv_dtype).removeprefix("torch."), kv_bytes / GiB, blocks,
             block_size, tokens, max_model_len, tokens / max_model_len)
