"""Prometheus metrics for the server (prometheus_client, one registry per app)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine_stats: Callable[[], dict[str, int]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("dsv2_requests", "HTTP requests by response status", ["status"], registry=r)
        self.prompt_tokens = Counter("dsv2_prompt_tokens", "Prompt tokens of completed requests", registry=r)
        self.generated_tokens = Counter("dsv2_generation_tokens", "Tokens generated for completed requests",
                                        registry=r)
        self.ttft = Histogram("dsv2_time_to_first_token_seconds", "Time from arrival to the first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("dsv2_inter_token_latency_seconds", "Time between consecutive tokens",
                             buckets=_LATENCY_BUCKETS, registry=r)
        gauges = {"running": "Requests being computed", "waiting": "Requests queued for the engine",
                  "cache_blocks_used": "Latent cache blocks in use", "cache_blocks_total": "Latent cache blocks",
                  "preemptions": "Sequences preempted (recomputed later) since start",
                  "failed_steps": "Engine steps that raised (their requests got an error) since start"}
        for key, doc in gauges.items():
            Gauge(f"dsv2_{key}", doc, registry=r).set_function(lambda key=key: engine_stats()[key])

    def finished(self, prompt_tokens: int, generated_tokens: int) -> None:
        self.requests.labels(status="200").inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generated_tokens.inc(generated_tokens)

    def rejected(self, status: int) -> None:
        self.requests.labels(status=str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
