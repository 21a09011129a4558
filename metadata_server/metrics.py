"""Prometheus metrics. Guest workers and the admin process are separate processes, so values go through
prometheus-client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, set by the CLI before any worker
starts) and the admin listener's ``/metrics`` adds them up. Without that variable (tests that build an
app in-process) each ``Metrics`` keeps its own registry.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .config import MULTIPROC_ENV
from .store import Store

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


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
        # labels() takes a lock and builds a key on every call; the hot path counts the same few series.
        self._series: dict[tuple[str, str, int], Any] = {}

    def count(self, listener: str, endpoint: str, status: int) -> None:
        """One answered request."""
        key = (listener, endpoint, status)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = self.requests.labels(listener, endpoint, str(status))
        series.inc()


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
