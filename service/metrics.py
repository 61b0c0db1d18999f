"""Prometheus metrics, one registry per app (tests start several apps in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
        self.queue_depth = Gauge("doctorglm_queue_depth", "Requests waiting for the engine", registry=r)
        self.active_streams = Gauge("doctorglm_active_streams", "Generations in progress", registry=r)
        self.retrieval = Histogram("doctorglm_retrieval_seconds", "Prompt designer retrieval latency",
                                   buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5), registry=r)
        self.emergencies = Counter("doctorglm_red_flags", "Requests triaged as emergencies", registry=r)
        self.finish = Counter("doctorglm_finish_reasons", "Finished generations by reason", ["reason"], registry=r)
