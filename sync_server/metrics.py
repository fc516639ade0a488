"""Prometheus metrics: requests, latency, batch sizes, throttled requests, rollout states, devices per version.

Each app has its own `CollectorRegistry` (several apps can live in one process, as in the tests).
Request counters and histograms are updated as requests finish; rollout and device gauges are
computed from the database when `/metrics` is scraped.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

disable_created_metrics()  # the *_created series double the output and nobody here graphs them

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The metrics of one app."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "sync_server_requests", "HTTP requests by method, route template and status", ["method", "route", "status"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "sync_server_request_duration_seconds", "HTTP request latency by method and route template", ["method", "route"],
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.batch_size = Histogram(
            "sync_server_predict_batch_size", "Photos per backend call of the fallback", ["backend"],
            buckets=_BATCH_BUCKETS, registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "sync_server_predict_batch_duration_seconds", "Time of one backend call of the fallback", ["backend"],
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.predictions = Counter(
            "sync_server_predictions", "Fallback predictions by model and outcome (ok or an error code)", ["model", "outcome"],
            registry=self.registry,
        )
        self.throttled = Counter(
            "sync_server_throttled_requests", "Requests answered 429 by scope (predict, reports, enroll)", ["scope"],
            registry=self.registry,
        )

    def add_state(self, collect: Callable[[], Iterable[GaugeMetricFamily]]) -> None:
        """Gauges computed at scrape time (rollouts, devices, TF Serving)."""
        self.registry.register(_FunctionCollector(collect))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _FunctionCollector(Collector):
    def __init__(self, collect: Callable[[], Iterable[GaugeMetricFamily]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Any]:
        return list(self._collect())

    def describe(self) -> Iterable[Any]:
        return []


def gauge(name: str, documentation: str, labels: list[str], samples: Iterable[tuple[list[str], float]]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=labels)
    for values, value in samples:
        family.add_metric(values, value)
    return family
