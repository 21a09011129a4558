"""Prometheus metrics. Guest workers and the admin process are separate processes, so values go through
prometheus-client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, set by the CLI before any worker
starts) and the admin listener's ``/metrics`` adds them up. Without that variable (tests that build an
app in-process) each ``Metrics`` keeps its own registry.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .config import MULTIPROC_ENV
from .store import Store

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# The guest's hot path answers in well under a millisecond; an admin write waits for an fsync.
# WSGI environ keys: when the request arrived, and that it was held as a long-poll (then not timed).
STARTED_KEY = "metadata_server.started"
LONG_POLL_KEY = "metadata_server.long_poll"
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "metadata_server_requests",
            "HTTP requests answered, by listener, endpoint and status",
            ["listener", "endpoint", "status"],
            registry=self.registry,
        )
        self.held_long_polls = Gauge(
            "metadata_server_held_long_polls",
            "Long-polls currently held open",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.latency = Histogram(
            "metadata_server_request_duration_seconds",
            "Time to answer a request, by listener and endpoint (held long-polls are not included)",
            ["listener", "endpoint"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        # labels() takes a lock and builds a key on every call; the hot path counts the same few series.
        self._series: dict[tuple[str, str, int], Any] = {}
        self._latency_series: dict[tuple[str, str], Any] = {}

    def count(self, listener: str, endpoint: str, status: int) -> None:
        """One answered request."""
        key = (listener, endpoint, status)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = self.requests.labels(listener, endpoint, str(status))
        series.inc()

    def observe(self, listener: str, endpoint: str, seconds: float) -> None:
        """How long one answered request took (not for held long-polls: their time is the guest's choice)."""
        key = (listener, endpoint)
        series = self._latency_series.get(key)
        if series is None:
            series = self._latency_series[key] = self.latency.labels(listener, endpoint)
        series.observe(seconds)


def time_flask_app(app: Any, metrics: Metrics, listener: str) -> None:
    """Count and time every request a Flask app answers (registered first, so 401s and 403s count too)."""
    from flask import request

    def started() -> None:
        request.environ.setdefault(STARTED_KEY, time.perf_counter())

    def finished(response: Any) -> Any:
        endpoint = request.url_rule.rule if request.url_rule is not None else "other"
        metrics.count(listener, endpoint, response.status_code)
        if not request.environ.get(LONG_POLL_KEY):
            metrics.observe(listener, endpoint, time.perf_counter() - request.environ[STARTED_KEY])
        return response

    app.before_request_funcs.setdefault(None, []).insert(0, started)
    app.after_request(finished)


class EventsCollector(Collector):
    """Events by kind and state, read from the store at scrape time."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "metadata_server_events",
            "Current maintenance events by event and state",
            labels=["event", "state"],
        )
        counts: dict[tuple[str, str], int] = {}
        droplets = self._store.all()
        for d in droplets:
            if d.event is not None:
                key = (d.event.kind.value, d.event.state.value)
                counts[key] = counts.get(key, 0) + 1
        for (event, state), n in sorted(counts.items()):
            family.add_metric([event, state], n)
        yield family
        yield GaugeMetricFamily("metadata_server_droplets", "Registered droplets", value=len(droplets))


def exposition(store: Store, own: Metrics) -> bytes:
    """The text for ``GET /metrics``: every process's counters plus the store-derived gauges."""
    registry = CollectorRegistry()
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        out = generate_latest(registry)
    else:
        out = generate_latest(own.registry)
    extra = CollectorRegistry()
    extra.register(EventsCollector(store))
    return out + generate_latest(extra)
