"""The executor's Prometheus metrics: attempts by outcome, durations, downtime, bytes, throttle;
migrations by state (read from the store at scrape time)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from host_engine.attempt import MigrationResult
from host_engine.errors import HostEngineError
from host_engine.states import MigrationState
from host_engine.store import Store

log = logging.getLogger(__name__)


class _StatesCollector(Collector):
    """Migrations by state, read from the store at scrape time (every worker reports the same numbers)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("host_engine_migrations", "Migrations by state", labels=["state"])
        up = GaugeMetricFamily("host_engine_store_up", "Whether the store answered this scrape")
        counts = dict.fromkeys(MigrationState, 0)
        try:
            for m in self._store.list_migrations():
                counts[m.state] += 1
        except HostEngineError as e:  # a store outage: the engine rides it out, and so does /metrics
            log.debug("metrics: store unreachable: %s", e)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        for state, n in counts.items():
            family.add_metric([state.value], n)
        yield family


class ExecutorMetrics:
    """Prometheus metrics of migrations (``host-engine run`` serves ``exposition()`` on ``/metrics``)."""

    def __init__(self, store: Store, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.attempts = Counter(
            "host_engine_migration_attempts",
            "Finished attempts by outcome",
            ["outcome"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "host_engine_migration_duration_seconds",
            "Duration of finished attempts",
            buckets=(10, 30, 60, 120, 300, 600, 1800, 3600, 7200),
            registry=self.registry,
        )
        self.downtime = Histogram(
            "host_engine_migration_downtime_seconds",
            "Pause at switchover of completed attempts",
            buckets=(0.01, 0.03, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 5.0),
            registry=self.registry,
        )
        self.transferred = Counter(
            "host_engine_migration_transferred_bytes", "Bytes sent by attempts", registry=self.registry
        )
        self.throttle = Counter(
            "host_engine_migration_throttle_percent_seconds",
            "vCPU throttle applied, percent x seconds",
            registry=self.registry,
        )
        self.disk_limit = Counter(
            "host_engine_migration_disk_limit_seconds",
            "Time guests spent under a temporary disk write limit",
            registry=self.registry,
        )
        self.registry.register(_StatesCollector(store))

    def observe(self, result: MigrationResult) -> None:
        self.attempts.labels(result.outcome.value).inc()
        self.duration.observe(result.duration_s)
        if result.downtime_ms is not None:
            self.downtime.observe(result.downtime_ms / 1000.0)
        self.transferred.inc(result.bytes_transferred)
        self.throttle.inc(result.throttle_pct_s)
        self.disk_limit.inc(result.disk_limit_s)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
