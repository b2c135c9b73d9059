"""Serve a model over an OpenAI-compatible HTTP API (FastAPI + uvicorn over the paged engine).

    ember serve --model runs/quickstart/base                          # http://127.0.0.1:8000/v1
    ember serve --model DIR --served-model-name qs --api-key sk-local --max-num-seqs 128
    ember serve --model DIR --host 0.0.0.0 --port 9000 --max-model-len 2048 --kv-cache-memory 4
    ember serve --model smollm2-135m-instruct                        # then open http://127.0.0.1:8000/ to chat
    ember serve --model DIR --rag-index runs/idx          # chat answers grounded in an `ember rag` index
    ember serve --model runs/quickstart/pretrained --adapter runs/quickstart/finetune/adapter   # + a LoRA adapter
    ember serve --model DIR --tool-call-parser hermes        # how tool calls are read from replies
    ember serve --model DIR --replicas 2 --replica-cpus 1    # two engines behind one port (Ray Serve)

Routes: /v1/completions, /v1/chat/completions (streaming with `"stream": true`), /v1/models,
/tokenize, /detokenize, /health, /metrics (Prometheus), and a chat page at / (--no-ui: none). It binds to 127.0.0.1 unless --host
says otherwise; --api-key guards /v1/*. Requests beyond max_num_seqs running + --max-queue-len
waiting get HTTP 429. SIGTERM (or Ctrl-C) drains the requests in flight for at most
--drain-timeout seconds, then exits. Every engine flag of `ember.LLM` is available. With
--rag-index, chat completions are grounded in the index (unless a request sends "rag": false)
and list their sources in the response. Chat `tools` / `tool_choice` and `response_format` (json_object,
json_schema) work as OpenAI's; the structured-outputs fields need llguidance (`ember[structured]`).
With --replicas N (or --min-replicas/--max-replicas) the engine runs as N Ray Serve replicas behind
one port, requests routed by prompt prefix (ember/serve/ray.py; `pip install 'ember[ray]'`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from ember.checkpoint.registry import MODEL_HELP, resolve_model_path
from ember.engine.config import EngineConfig
from ember.errors import EmberError
from ember.commands.serve_replicas import ReplicaFlags

log = logging.getLogger("ember.serve")


class ServeConfigError(EmberError):
    """A server setting out of range."""


@dataclass
class ServeConfig(ReplicaFlags, EngineConfig):
    """Serve a model folder over the OpenAI API (every engine setting is a flag too)."""

    model: Path = field(kw_only=True, metadata={"help": MODEL_HELP})
    tokenizer: Path | None = field(default=None, kw_only=True,
                                   metadata={"help": "tokenizer folder (default: the model folder)"})
    adapter: Path | None = field(default=None, kw_only=True, metadata={
        "help": "PEFT LoRA adapter folder applied to the model (merged into full-precision weights)"})
    served_model_name: str | None = field(default=None, kw_only=True, metadata={
        "help": "the name clients send as `model` (default: --model as given)"})
    host: str = field(default="127.0.0.1", kw_only=True, metadata={"help": "address to bind (0.0.0.0: all)"})
    port: int = field(default=8000, kw_only=True, metadata={"help": "TCP port"})
    api_key: str | None = field(default=None, kw_only=True, metadata={
        "help": "require 'Authorization: Bearer KEY' on /v1/*"})
    max_queue_len: int = field(default=256, kw_only=True, metadata={
        "help": "requests allowed to wait for a running slot; beyond it: HTTP 429"})
    max_body_mb: float = field(default=16.0, kw_only=True, metadata={"help": "largest request body, MiB (413)"})
    drain_timeout: float = field(default=30.0, kw_only=True, metadata={
        "help": "seconds to finish requests in flight after SIGTERM"})
    log_interval: float = field(default=10.0, kw_only=True, metadata={
        "help": "seconds between throughput log lines (0: off)"})
    access_log: bool = field(default=True, kw_only=True, metadata={"help": "log one line per HTTP request"})
    ui: bool = field(default=True, kw_only=True, metadata={
        "help": "serve the chat page at / (--no-ui: the JSON API only)"})
    rag_index: Path | None = field(default=None, kw_only=True, metadata={
        "help": "ground chat answers in this `ember rag` index (responses list their sources)"})
    rag_k: int = field(default=5, kw_only=True, metadata={"help": "sources retrieved per grounded request"})
    rag_mode: Literal["dense", "bm25", "hybrid"] = field(default="hybrid", kw_only=True,
                                                         metadata={"help": "retrieval mode"})
    rag_max_tokens: int = field(default=256, kw_only=True, metadata={
        "help": "answer budget of a grounded request that sets none (the sources fill the rest)"})
    dtype: str = field(default="float32", kw_only=True, metadata={"help": "float32, bfloat16 or float16"})
    device: str | None = field(default=None, kw_only=True, metadata={"help": "cpu, cuda, ... (default: cpu)"})
    tool_call_parser: Literal["hermes", "llama3_json", "mistral"] | None = field(default=None, kw_only=True, metadata={
        "help": "format of the model's tool calls (default: guessed from the chat template, else hermes)"})
    threads: int | None = field(default=None, kw_only=True, metadata={
        "help": "torch CPU threads (default: all cores but one, left to the HTTP event loop)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.port < 65536:
            raise ServeConfigError(f"--port must be in 1..65535, got {self.port}")
        if self.max_queue_len < 0:
            raise ServeConfigError(f"--max-queue-len must be >= 0, got {self.max_queue_len}")
        if self.max_body_mb <= 0:
            raise ServeConfigError(f"--max-body-mb must be > 0, got {self.max_body_mb}")
        if self.rag_k < 1 or self.rag_max_tokens < 1:
            raise ServeConfigError("--rag-k and --rag-max-tokens must be >= 1")
        self.check_replicas(self.max_num_seqs)


CONFIG = ServeConfig


def engine_kwargs(cfg: EngineConfig) -> dict:
    """The EngineConfig fields of a config that extends EngineConfig."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(EngineConfig)}


def cpu_threads(threads: int | None) -> int:
    """Torch threads for a server on a CPU: all cores but one unless told. OpenMP workers spin
    between steps, and a core they take from the event loop slows every stream (10x on 2 cores)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return threads or max(1, cores - 1)


def require_serve_extra() -> None:
    """One clear line instead of an ImportError when the optional serving packages are missing."""
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client", "httpx") if importlib.util.find_spec(m) is None]
    if missing:
        raise ServeConfigError(f"serving needs {', '.join(missing)}: pip install 'ember[serve]'")


def build(cfg: ServeConfig):
    """The app for a config (the model loaded, the engine sized), not yet running."""
    require_serve_extra()
    from ember.serve.app import create_app

    if not resolve_model_path(cfg.model).exists():
        raise ServeConfigError(f"--model {cfg.model} does not exist: give a model folder (config.json + weights), "
                               "a .gguf file or an installed model's name")
    if cfg.adapter is not None and not cfg.adapter.is_dir():
        raise ServeConfigError(f"--adapter {cfg.adapter} is not a folder: give a PEFT adapter folder "
                               "(adapter_config.json + adapter_model.safetensors)")
    if cfg.device in (None, "cpu") or cfg.threads:
        torch.set_num_threads(cpu_threads(cfg.threads))
    return create_app(cfg.model, cfg.tokenizer, served_model_name=cfg.served_model_name, api_key=cfg.api_key,
                      max_queue_len=cfg.max_queue_len, max_body_bytes=int(cfg.max_body_mb * 2 ** 20),
                      log_interval=cfg.log_interval, dtype=cfg.dtype, device=cfg.device, adapter=cfg.adapter,
                      rag_index=cfg.rag_index, ui=cfg.ui, tool_call_parser=cfg.tool_call_parser,
                      rag_k=cfg.rag_k, rag_mode=cfg.rag_mode, rag_max_tokens=cfg.rag_max_tokens, **engine_kwargs(cfg))


def main(cfg: ServeConfig) -> None:
    from ember.serve.server import serve

    if cfg.on_ray:  # --replicas / --min-replicas: the engine on Ray Serve replicas (serve/ray.py)
        if cfg.world_size > 1:
            raise ServeConfigError("--replicas runs one-process engines on Ray Serve: drop --tensor-parallel-size / "
                                   "--pipeline-parallel-size there, or serve one parallel engine without --replicas")
        from ember.serve.ray import run_fleet

        return run_fleet(cfg)
    app = build(cfg)
    serving = app.state.serving
    log.info("serving %s as %r on http://%s:%d/v1 (max_model_len %d, %d running + %d queued requests)",
             cfg.model, serving.model_name, cfg.host, cfg.port, serving.max_model_len,
             cfg.max_num_seqs, cfg.max_queue_len)
    if cfg.ui:
        log.info("chat page: http://%s:%d/", cfg.host, cfg.port)
    failure: list[str] = []
    runner = serving.engine.engine.runner
    if hasattr(runner, "on_failure"):  # a parallel engine: a dead rank takes the server down (drained)
        def down(message: str) -> None:
            failure.append(message)
            os.kill(os.getpid(), signal.SIGTERM)

        runner.on_failure = down
    serve(app, host=cfg.host, port=cfg.port, drain_timeout=cfg.drain_timeout, access_log=cfg.access_log)
    if failure:
        from ember.parallel import ParallelError

        raise ParallelError(f"the server stopped: {failure[0]}")


def stage_serve(state) -> None:
    """Quickstart stage: serve the latest model (grounded in the rag stage's index when there is one),
    ask it through the official openai client (whole and streamed), print the answers, the sources
    and a few /metrics figures, stop the server."""
    import httpx
    import openai

    from ember.serve import create_app, running

    fast = state.cfg.fast
    index = state.cfg.out / "rag-index"
    app = create_app(state.model_dir, served_model_name="quickstart", kv_cache_memory=0.25, max_num_seqs=16,
                     log_interval=0, rag_index=index if (index / "index.json").is_file() else None,
                     rag_max_tokens=32 if fast else 64)
    question = [{"role": "user", "content": "What does a Python list comprehension do?"}]
    max_tokens = 16 if fast else 48
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        whole = client.completions.create(model="quickstart", prompt="def parse(line):", max_tokens=max_tokens,
                                          temperature=0)
        chunks = list(client.chat.completions.create(model="quickstart", messages=question, max_tokens=max_tokens,
                                                     temperature=0.7, seed=state.cfg.seed, stream=True,
                                                     extra_body={"rag": False}))
        grounded = None
        if app.state.serving.grounding is not None:
            grounded = client.chat.completions.create(model="quickstart", messages=question, temperature=0)
        metrics = httpx.get(url + "/metrics").text
    figures: dict[str, float] = {}
    for line in metrics.splitlines():
        name = line.split("{", 1)[0].removeprefix("ember:")
        if name in ("generation_tokens_total", "request_success_total", "time_to_first_token_seconds_sum",
                    "time_to_first_token_seconds_count", "kv_cache_usage_perc"):
            figures[name] = figures.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    ttft = figures["time_to_first_token_seconds_sum"] / max(figures["time_to_first_token_seconds_count"], 1)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    print(f"  /v1/completions: 'def parse(line):' -> {whole.choices[0].text[:60]!r} "
          f"({whole.usage.completion_tokens} tokens)")
    print(f"  /v1/chat/completions streamed {len(chunks)} chunks: {text[:60]!r}")
    if grounded is not None:
        sources = grounded.model_extra["sources"]
        print(f"  grounded in {index.name}/ ({grounded.usage.prompt_tokens}-token prompt): "
              f"{grounded.choices[0].message.content[:60]!r}; sources "
              + ", ".join(f"[{s['n']}] {s['source']}" for s in sources))
    print(f"  /metrics: {figures['request_success_total']:.0f} requests, {figures['generation_tokens_total']:.0f} "
          f"tokens generated, mean TTFT {1000 * ttft:.0f} ms, KV cache usage {figures['kv_cache_usage_perc']:.0%}")
