"""Prometheus metrics of one server (GET /metrics), named after vLLM's under an `ember:` prefix.

    metrics = ServerMetrics(engine.stats, "my-model")
    async for out in metrics.track(stream): ...      # latency histograms, success / failure counts
    metrics.render()                                 # Prometheus text exposition

Every metric lives in the server's own CollectorRegistry (two apps in one process never share
a counter). Engine gauges and counters are read from `AsyncLLMEngine.stats()` at scrape time:

    ember:num_requests_running / _waiting      sequences in the running list / waiting queue
    ember:kv_cache_usage_perc                  fraction (0..1, as vLLM) of KV blocks held by requests
    ember:prefix_cache_queries_total / _hits_total   prompt tokens looked up / found in the prefix cache
    ember:num_preemptions_total, ember:prompt_tokens_total, ember:generation_tokens_total
    with --kv-offload-gb (ember/engine/kv_offload.py):
    ember:kv_offload_usage_perc                fraction of the offload tier's blocks in use
    ember:kv_offload_stored_blocks_total{kind}     blocks copied pool -> tier: prefix (evicted
    ember:kv_offload_restored_blocks_total{kind}   prefix-cache blocks) | swap (preempted sequences);
                                                   restored: copied back instead of recomputed
    ember:kv_offload_dropped_blocks_total      prefix blocks dropped from a full tier (LRU)
    ember:kv_offload_swapped_sequences_total   preemptions served by a swap, not a recompute

The server counts requests and latencies as their streams end:

    ember:request_success_total{finished_reason}   stop | length | abort
    ember:request_failure_total{reason}            the error code: invalid_value, queue_full,
                                                   context_length_exceeded, client_disconnected, ...
    ember:time_to_first_token_seconds, ember:inter_token_latency_seconds,
    ember:e2e_request_latency_seconds, ember:request_queue_time_seconds (histograms),
    ember:request_prompt_tokens, ember:request_generation_tokens (histograms)

Latency buckets grow by 2^(1/3) from 0.25 ms to ~260 s, so a quantile read from them is within
~13 % (P95 stays meaningful). `log_loop` writes one line every interval while there is work.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ember.engine.engine import EngineStats, OffloadStats
from ember.engine.request import RequestOutput

log = logging.getLogger("ember.serve")

LATENCY_BUCKETS = tuple(round(0.00025 * 2 ** (k / 3), 6) for k in range(61))
TOKEN_BUCKETS = tuple(m * 10 ** e for e in range(6) for m in (1, 2, 5))


class _EngineCollector:
    """Reads the engine's gauges and counters at scrape time (no copies to keep in sync)."""

    def __init__(self, stats: Callable[[], EngineStats], model_name: str) -> None:
        self.stats = stats
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        s = self.stats()
        gauges = [("num_requests_running", "Sequences running (scheduled each step).", s.num_running),
                  ("num_requests_waiting", "Sequences waiting for a running slot.", s.num_waiting),
                  ("kv_cache_usage_perc", "Fraction of KV cache blocks held by requests (1 = full).",
                   s.kv_cache_usage)]
        counters = [("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prefix_cache_queries),
                    ("prefix_cache_hits", "Prompt tokens served from the prefix cache.", s.prefix_cache_hits),
                    ("num_preemptions",
                     "Sequences preempted (KV blocks freed; recomputed later, or swapped to the KV offload tier).",
                     s.num_preemptions),
                    ("prompt_tokens", "Prompt tokens processed.", s.prompt_tokens_total),
                    ("generation_tokens", "Tokens generated.", s.generation_tokens_total)]
        for name, doc, value in gauges:
            g = GaugeMetricFamily(f"ember:{name}", doc, labels=["model_name"])
            g.add_metric([self.model_name], value)
            yield g
        for name, doc, value in counters:
            c = CounterMetricFamily(f"ember:{name}", doc, labels=["model_name"])
            c.add_metric([self.model_name], value)
            yield c
        if s.kv_offload is not None:
            yield from self._offload(s.kv_offload)

    def _offload(self, o: OffloadStats) -> Iterator[Metric]:
        m = [self.model_name]
        g = GaugeMetricFamily("ember:kv_offload_usage_perc", "Fraction of the KV offload tier's blocks in use.",
                              labels=["model_name"])
        g.add_metric(m, o.usage)
        yield g
        for name, doc, prefix, swap in [
                ("kv_offload_stored_blocks", "KV blocks copied from the pool into the offload tier.",
                 o.stored_prefix_blocks, o.stored_swap_blocks),
                ("kv_offload_restored_blocks", "KV blocks copied from the offload tier back into the pool.",
                 o.restored_prefix_blocks, o.restored_swap_blocks)]:
            c = CounterMetricFamily(f"ember:{name}", doc, labels=["model_name", "kind"])
            c.add_metric(m + ["prefix"], prefix)
            c.add_metric(m + ["swap"], swap)
            yield c
        for name, doc, value in [
                ("kv_offload_dropped_blocks", "Prefix blocks dropped from a full offload tier (LRU).", o.dropped_blocks),
                ("kv_offload_swapped_sequences", "Preempted sequences swapped to the offload tier, not recomputed.",
                 o.swapped_sequences)]:
            c = CounterMetricFamily(f"ember:{name}", doc, labels=["model_name"])
            c.add_metric(m, value)
            yield c


class ServerMetrics:
    """The registry of one server and the per-request instruments; see the module docstring."""

    def __init__(self, stats: Callable[[], EngineStats], model_name: str) -> None:
        self.stats = stats
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(stats, model_name))
        r, m = self.registry, ["model_name"]
        self.success = Counter("ember:request_success", "Requests finished, by finish reason.",
                               m + ["finished_reason"], registry=r)
        self.failure = Counter("ember:request_failure", "Requests refused or broken off, by reason.",
                               m + ["reason"], registry=r)

        def hist(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(f"ember:{name}", doc, m, buckets=buckets, registry=r).labels(model_name)

        self.ttft = hist("time_to_first_token_seconds", "Arrival to first generated token.", LATENCY_BUCKETS)
        self.itl = hist("inter_token_latency_seconds", "Between consecutive tokens of a sequence.", LATENCY_BUCKETS)
        self.e2e = hist("e2e_request_latency_seconds", "Arrival to the last token.", LATENCY_BUCKETS)
        self.queue_time = hist("request_queue_time_seconds", "Arrival to first scheduled.", LATENCY_BUCKETS)
        self.prompt_tokens = hist("request_prompt_tokens", "Prompt tokens per request.", TOKEN_BUCKETS)
        self.generation_tokens = hist("request_generation_tokens", "Generated tokens per request.", TOKEN_BUCKETS)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def count_failure(self, reason: str) -> None:
        self.failure.labels(self.model_name, reason).inc()

    async def track(self, stream: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
        """Pass a request's deltas through, observing its latencies; count how it ended."""
        last_token: float | None = None
        ended = "client_disconnected"  # unless the stream finishes or fails
        try:
            async with aclosing(stream):
                async for out in stream:
                    m = out.metrics
                    if m.last_token_time is not None and any(c.token_ids for c in out.outputs):
                        if last_token is None:
                            if m.first_token_time is not None:
                                self.ttft.observe(m.first_token_time - m.arrival_time)
                        elif m.last_token_time > last_token:
                            self.itl.observe(m.last_token_time - last_token)
                        last_token = m.last_token_time
                    if out.finished:
                        ended = ""
                        self._finished(out)
                    yield out
        except Exception:
            ended = "engine_error"
            raise
        finally:
            if ended:
                self.count_failure(ended)

    def _finished(self, out: RequestOutput) -> None:
        m = out.metrics
        reason = next((c.finish_reason for c in out.outputs if c.finish_reason), None) or "abort"
        self.success.labels(self.model_name, reason).inc()
        end = m.finished_time or time.time()
        self.e2e.observe(end - m.arrival_time)
        if m.first_scheduled_time is not None:
            self.queue_time.observe(m.first_scheduled_time - m.arrival_time)
        self.prompt_tokens.observe(m.num_prompt_tokens)
        self.generation_tokens.observe(m.num_generation_tokens)

    async def log_loop(self, interval: float) -> None:
        """Every `interval` seconds with work to report, one line of throughput and load."""
        before, t0 = self.stats(), time.monotonic()
        while True:
            await asyncio.sleep(interval)
            now, t1 = self.stats(), time.monotonic()
            dt = max(t1 - t0, 1e-9)
            prompt = (now.prompt_tokens_total - before.prompt_tokens_total) / dt
            gen = (now.generation_tokens_total - before.generation_tokens_total) / dt
            queries = now.prefix_cache_queries - before.prefix_cache_queries
            hits = now.prefix_cache_hits - before.prefix_cache_hits
            if prompt or gen or now.num_running or now.num_waiting:
                log.info("prompt %.1f tok/s, generation %.1f tok/s, running %d, waiting %d, KV cache %.1f%%, "
                         "prefix cache hit rate %.1f%%", prompt, gen, now.num_running, now.num_waiting,
                         100 * now.kv_cache_usage, 100 * hits / queries if queries else 0.0)
            before, t0 = now, t1
