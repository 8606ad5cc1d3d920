"""Prometheus metrics of the search service, in a registry of its own (one per app)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from heimdex_clip_assets.pipeline.search import SearchService

# Search latency lives between a cached 5 ms and a cold remote worker's seconds.
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class EncoderCollector(Collector):
    """The service's own counts of model calls, read at scrape time (the batcher keeps them)."""

    def __init__(self, service: SearchService) -> None:
        self.service = service

    def collect(self) -> Iterator[CounterMetricFamily]:
        backend = self.service.encoder.backend
        calls = CounterMetricFamily(
            "heimdex_search_encoder_calls",
            "Model calls (one text call encodes every query waiting at that moment)",
            labels=["kind", "backend"],
        )
        calls.add_metric(["text", backend], self.service.batcher.batches)
        calls.add_metric(["image", backend], self.service.images_encoded)
        yield calls
        texts = CounterMetricFamily(
            "heimdex_search_encoded_texts", "Text queries encoded (cache misses)", labels=["backend"]
        )
        texts.add_metric([backend], self.service.batcher.texts)
        yield texts


class Metrics:
    def __init__(self, service: SearchService) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(EncoderCollector(service))
        self.requests = Counter(
            "heimdex_search_requests", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "heimdex_search_request_seconds",
            "HTTP request latency",
            ["route"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.cache = Counter(
            "heimdex_search_query_cache",
            "Text query vector cache lookups",
            ["result"],
            registry=self.registry,
        )
        self.errors = Counter(
            "heimdex_search_errors", "Error responses by code", ["code"], registry=self.registry
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts and times every request by its route template (``/v1/search``, not each query)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route: Any = scope.get("route")
            path = getattr(route, "path", None) or (
                "/static" if scope["path"].startswith("/static") else "other"
            )
            self.metrics.requests.labels(scope["method"], path, str(status)).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - started)
