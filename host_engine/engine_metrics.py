"""The engine's own health and metrics (``host-engine run --metrics-listen``); the migrations' metrics are
:mod:`host_engine.executor_metrics`.

- **Liveness** (``/livez``): every loop of the process went round recently. The engine loop (notices, acks,
  reconciliation) reports each tick it finishes (:meth:`EngineMetrics.tick_finished`, whatever its outcome:
  a store outage is ridden out, not a reason to restart), the executor loop each pass through its steps
  (:meth:`EngineMetrics.beat_step`). A loop silent for longer than ``3 x poll interval +``
  :data:`LIVENESS_SLACK_S` is stuck (a deadlock, a call that never returns): restarting the process is then
  the cure. The slack is generous on purpose: one tick legitimately waits out an unreachable metadata server
  (timeouts and retries), and a restart of a healthy but slow engine hands its running attempts over.
- **Readiness** (``/readyz``, :class:`Readiness`): the store answers now and this process holds its worker
  name.
- **Metrics**, in their own registry:

  * ``host_engine_last_successful_tick_timestamp_seconds{worker}``: unix time of the last engine tick that ran
    through without a store failure (absent until the first one);
  * ``host_engine_tick_duration_seconds``: a histogram of the engine loop's ticks (failed ones too);
  * ``host_engine_metadata_server_up{server}``: 1 if the engine's most recent request to that metadata server
    got a usable answer, 0 if it could not be used (see :meth:`EngineMetrics.server_answered`). ``server`` is
    the admin URL without credentials, query or trailing slash (:func:`server_label`).
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest

from host_engine import schema as t
from host_engine.errors import HostEngineError
from host_engine.store import Store

log = logging.getLogger(__name__)

#: A loop is stuck once silent for ``LIVENESS_POLLS`` poll intervals plus this.
LIVENESS_SLACK_S = 120.0
LIVENESS_POLLS = 3
TICK_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
#: A readiness check waits this long for one already in progress (a hung store connection) before saying
#: "not ready", so probes piling up against a dead database do not pile up threads.
READINESS_WAIT_S = 5.0


class Loop(enum.Enum):
    """The loops whose heartbeat liveness watches."""

    ENGINE = "engine"  # notices, acks, reconciliation (Engine._ticks)
    EXECUTOR = "executor"  # the executor and the worker name's checks (the engine's steps)


def server_label(url: str) -> str:
    """A metadata server's admin URL as a metric label: no user or password, query or fragment, no trailing
    slash.

    >>> server_label("https://engine:s3cret@md1.example:8443/?token=x")
    'https://md1.example:8443'
    """
    parts = urlsplit(url.strip())
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


class EngineMetrics:
    """Heartbeats of the loops (liveness) and the engine's own Prometheus metrics.

    ``monotonic`` and ``wall`` are injectable so tests need not wait. Thread-safe: the loops, the probe and
    the HTTP listener call it from their own threads."""

    def __init__(
        self,
        worker: str,
        *,
        poll_interval_s: float,
        loops: tuple[Loop, ...] = (Loop.ENGINE, Loop.EXECUTOR),
        slack_s: float = LIVENESS_SLACK_S,
        registry: CollectorRegistry | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.worker = worker
        self.registry = registry or CollectorRegistry()
        self.stale_after_s = LIVENESS_POLLS * poll_interval_s + slack_s
        self._monotonic = monotonic
        self._wall = wall
        self._lock = threading.Lock()
        started = monotonic()
        self._beats = dict.fromkeys(loops, started)  # a loop that never beat counts from the start
        self._answered_at: dict[str, float] = {}
        self._ticked = False
        self.last_tick = Gauge(
            "host_engine_last_successful_tick_timestamp_seconds",
            "Unix time the engine's tick last ran through without a store failure",
            ["worker"],
            registry=self.registry,
        )
        self.tick_duration = Histogram(
            "host_engine_tick_duration_seconds",
            "Duration of the engine loop's ticks (notices, acks, reconciliation)",
            buckets=TICK_BUCKETS_S,
            registry=self.registry,
        )
        self.server_up = Gauge(
            "host_engine_metadata_server_up",
            "Whether the engine's most recent request to the metadata server got a usable answer",
            ["server"],
            registry=self.registry,
        )

    # ---- loops -------------------------------------------------------------------------------------------

    def beat(self, loop: Loop) -> None:
        with self._lock:
            self._beats[loop] = self._monotonic()

    def tick_finished(self, ok: bool, duration_s: float) -> None:
        """The engine loop finished a tick (``Engine.on_tick``); ``ok``: without a store failure."""
        self.beat(Loop.ENGINE)
        self.tick_duration.observe(duration_s)
        if ok:
            self._ticked = True
            self.last_tick.labels(self.worker).set(self._wall())

    def has_ticked(self) -> bool:
        """Whether the engine loop has run a tick through without a store failure: start-up (wiring the
        driver, taking back this worker's own attempts) is over and the loop rides out outages from now on."""
        return self._ticked

    def beat_step(self, loop: Loop = Loop.EXECUTOR) -> _Beat:
        """An engine step that records a heartbeat of the loop it runs on (put it last in the steps)."""
        return _Beat(self, loop)

    def live(self) -> bool:
        """Whether every watched loop went round within :attr:`stale_after_s`."""
        now = self._monotonic()
        with self._lock:
            silent = {loop: now - at for loop, at in self._beats.items() if now - at > self.stale_after_s}
        for loop, silent_s in silent.items():
            log.warning("liveness: the %s loop has been silent for %.0f s", loop.value, silent_s)
        return not silent

    # ---- metadata servers --------------------------------------------------------------------------------

    def server_answered(self, url: str, ok: bool) -> None:
        """The outcome of a request to the metadata server at ``url`` (``AdminClient.observer``): ``ok`` when
        it answered usably, False when it could not be reached, timed out, failed TLS, answered 5xx/429
        through every retry, or refused the engine's token."""
        label = server_label(url)
        with self._lock:
            self._answered_at[label] = self._monotonic()
        self.server_up.labels(label).set(1 if ok else 0)

    def answered_ago_s(self, url: str) -> float | None:
        """Seconds since the engine last heard from (or failed to reach) the server; None: never."""
        with self._lock:
            at = self._answered_at.get(server_label(url))
        return None if at is None else self._monotonic() - at

    def keep_servers(self, urls: set[str]) -> None:
        """Drop the gauges of servers no host names any more."""
        keep = {server_label(u) for u in urls}
        with self._lock:
            gone = set(self._answered_at) - keep
            for label in gone:
                del self._answered_at[label]
        for label in gone:
            self.server_up.remove(label)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _Beat:
    """An engine step whose ``tick`` is a heartbeat of its loop."""

    def __init__(self, metrics: EngineMetrics, loop: Loop) -> None:
        self._metrics = metrics
        self._loop = loop

    def tick(self) -> None:
        self._metrics.beat(self._loop)


class Readiness:
    """``/readyz``: ``started()`` says the engine loop is running (start-up is not outage-proof: a store
    lost then ends the process), the store answers (a read of this worker's row) and ``holds_name()`` says
    this process still holds its worker name. One check at a time (see :data:`READINESS_WAIT_S`)."""

    def __init__(
        self,
        store: Store,
        worker: str,
        holds_name: Callable[[], bool],
        *,
        started: Callable[[], bool] = lambda: True,
    ) -> None:
        self.store = store
        self.worker = worker
        self.holds_name = holds_name
        self.started = started
        self._busy = threading.Lock()

    def __call__(self) -> bool:
        if not self._busy.acquire(timeout=READINESS_WAIT_S):
            log.warning("readiness: the previous check of the store is still waiting for it")
            return False
        try:
            if not self.started():
                log.info("readiness: worker %s is still starting", self.worker)
                return False
            if not self.holds_name():
                log.warning("readiness: worker %s does not hold its name", self.worker)
                return False
            try:
                with self.store.begin(readonly=True) as tx:
                    w = t.workers
                    tx.conn.execute(sa.select(w.c.name).where(w.c.name == self.worker)).first()
            except HostEngineError as e:
                log.warning("readiness: the store does not answer: %s", e)
                return False
            return True
        finally:
            self._busy.release()
