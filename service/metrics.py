"""Prometheus metrics, one registry per app (tests start several apps in one process)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("doctorglm_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.latency = Histogram("doctorglm_request_seconds", "Request latency by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("doctorglm_time_to_first_token_seconds", "Time to the first generated text",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("doctorglm_generated_tokens", "Generated tokens", registry=r)
        self.queued_requests = Gauge("doctorglm_queued_requests", "Requests waiting for a generation row",
                                     registry=r)
        self.queue_depth = Gauge("doctorglm_queue_depth", "Same as doctorglm_queued_requests (older name)",
                                 registry=r)
        self.active_streams = Gauge("doctorglm_active_streams", "Generations running now (queued ones excluded)",
                                    registry=r)
        self.retrieval = Histogram("doctorglm_retrieval_seconds", "Prompt designer retrieval latency",
                                   buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5), registry=r)
        self.emergencies = Counter("doctorglm_red_flags", "Requests triaged as emergencies", registry=r)
        self.finish = Counter("doctorglm_finish_reasons", "Finished generations by reason", ["reason"], registry=r)

    def watch_engine(self, stats: Callable[[], dict[str, int]]) -> None:
        """Read the running and queued gauges from the engine at every scrape (never stale, never counted twice)."""
        self.active_streams.set_function(lambda: stats()["active"])
        self.queued_requests.set_function(lambda: stats()["queued"])
        self.queue_depth.set_function(lambda: stats()["queued"])
        self.registry.register(_EngineCollector(stats))


class _EngineCollector(Collector):
    """The engine's running totals (prompt cache, worker time) as counters; one stats() call per scrape."""

    def __init__(self, stats: Callable[[], dict[str, int]]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self.stats()
        yield CounterMetricFamily("doctorglm_prompt_tokens", "Prompt tokens prefilled, cached ones included",
                                  value=stats.get("prompt_tokens", 0))
        yield CounterMetricFamily("doctorglm_prompt_cache_reused_tokens",
                                  "Prompt tokens whose keys/values came from the prompt cache",
                                  value=stats.get("prompt_cache_reused_tokens", 0))
        yield GaugeMetricFamily("doctorglm_prompt_cache_bytes", "Memory the prompt cache holds",
                                value=stats.get("prompt_cache_bytes", 0))
        # The worker's time: decode seconds / steps is the step under the real load; rows / steps the mean batch.
        # Only an engine that counts it (the local one): an upstream engine has no worker here, and a 0 that never
        # moves would read as an idle worker on a dashboard.
        if "decode_steps" not in stats:
            return
        yield CounterMetricFamily("doctorglm_decode_steps", "Decode steps (a batch forward, or a serial round)",
                                  value=stats["decode_steps"])
        yield CounterMetricFamily("doctorglm_decode_rows", "Rows summed over decode steps",
                                  value=stats.get("decode_rows", 0))
        yield CounterMetricFamily("doctorglm_decode_seconds", "Worker time in decode steps",
                                  value=stats.get("decode_us", 0) / 1e6)
        yield CounterMetricFamily("doctorglm_prefills", "Prefill forwards (a group of arrivals each)",
                                  value=stats.get("prefills", 0))
        yield CounterMetricFamily("doctorglm_prefill_seconds", "Worker time in prefills",
                                  value=stats.get("prefill_us", 0) / 1e6)
