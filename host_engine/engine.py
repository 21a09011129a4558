"""``host-engine run``: the long-running engine process. Several may run on one PostgreSQL store.

Every ``poll_interval`` it

1. sends the notices that are due (:mod:`host_engine.metadata.notices`): each worker claims a share of the due
   ``planned`` migrations (row locks), sets their event on the droplet's metadata server, and only then marks
   them ``notified`` (so ``notified`` always means the guest was told), with ``notified_at`` taken after the
   server answered and ``not_before`` moved if needed so the guest gets its full notice from that moment;
2. if this worker is the one elected for the fleet's chores (:mod:`host_engine.metadata.election`; exactly
   one at a time): reconciles every metadata server with the store (:meth:`MetadataSync.reconcile_all`) when
   it wins the election and every ``reconcile_every`` (a minute) after, clears the events of cancelled
   migrations whose guest had been told, and reads the guests' acknowledgements (``ready``/``offline``) of
   outstanding events into the store, one list per metadata server every ``ack_every`` (5 s;
   :class:`host_engine.metadata.acks.AckReader`), so the executor can start early or take the offline path;
3. runs any further steps it was given (part 2: the executor's ``tick``).

The clock and the sleep are parameters, so tests drive ticks without sleeping; SIGTERM/SIGINT set a flag that
ends the loop after the current tick (no half-written transaction: each change is one transaction anyway).
"""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import FrameType
from typing import Protocol

from host_engine.config import EngineConfig
from host_engine.errors import HostEngineError, StoreError
from host_engine.metadata.acks import ACK_READ_EVERY, AckReader
from host_engine.metadata.election import FleetLeader
from host_engine.metadata.notices import NoticeSender
from host_engine.metadata.reconcile import MetadataSync, ReconcileReport, pending_clears
from host_engine.models import Migration
from host_engine.store import Store
from host_engine.timeparse import Clock

log = logging.getLogger(__name__)

# A store outage: the loop retries after 1 s, doubling up to 10 s (with jitter), so a restarted database sees
# the fleet come back within seconds and not all at once.
STORE_RETRY_MIN_S = 1.0
STORE_RETRY_MAX_S = 10.0
# ``run`` on threads: the main thread looks for a signal this often, and on one gives the loops this long to
# finish what they are doing (then the executor's shutdown has its own grace, well within 10 s in all).
MAIN_WAIT_S = 0.5
STOP_JOIN_S = 2.0

# Reconcile every metadata server now and then, not only at start-up: a server that was unreachable when the
# executor finished a migration (its hooks log the failure and go on) would otherwise show the guest a stale
# event until the engine restarts. A minute keeps the extra load at one list request per server per minute.
RECONCILE_EVERY = timedelta(minutes=1)


class TickStep(Protocol):
    """Anything the loop should also run each tick (the executor in part 2)."""

    def tick(self) -> object: ...


@dataclass
class TickResult:
    notified: list[Migration] = field(default_factory=list)
    cleared: list[Migration] = field(default_factory=list)
    acked: list[Migration] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class Engine:
    """The engine loop. ``sleep`` defaults to waiting on the stop flag (so a signal wakes it at once)."""

    def __init__(
        self,
        store: Store,
        config: EngineConfig,
        sync: MetadataSync,
        *,
        clock: Clock | None = None,
        sleep: Callable[[float], None] | None = None,
        steps: Sequence[TickStep] = (),
        reconcile_every: timedelta = RECONCILE_EVERY,
        ack_every: timedelta = ACK_READ_EVERY,
        threads: bool = False,
    ) -> None:
        self.store = store
        self.config = config
        self.sync = sync
        self.acks = AckReader(store, sync, every=ack_every, clock=clock or store.clock)
        self.clock = clock or store.clock
        self._stop = threading.Event()
        self._sleep = sleep or (lambda s: self._stop.wait(s) and None)
        self.steps = list(steps)
        # ``run`` on threads: the steps (the executor) on one, notices/acks/reconcile on another, the main
        # thread only waiting for a signal (see ``_run_threads``). Tests that drive time keep one thread.
        self.threads = threads
        self._outage = StoreOutage("engine loop")
        # Told after each tick of the loop: (ran without a store failure, seconds it took); /livez, metrics.
        self.on_tick: Callable[[bool, float], object] = lambda ok, duration_s: None
        self._step_error: BaseException | None = None
        self.reconcile_reports: list[ReconcileReport] = []
        self._reconcile_pending = True
        self.reconcile_every = reconcile_every
        self._reconciled_at: datetime | None = None
        self.leader = FleetLeader(store)
        self._leading = False
        self.notices = NoticeSender(
            store, sync, config.worker_id, poll_interval_s=config.engine.poll_interval_s, clock=self.clock
        )

    # ---- control -----------------------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT end the loop after the current tick (call from the main thread)."""

        def handler(signum: int, _frame: FrameType | None) -> None:
            log.info("received %s: stopping after this tick", signal.Signals(signum).name)
            self.request_stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    # ---- work --------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Step down from the fleet's chores, so another worker takes them over at once."""
        self.leader.release()
        self._leading = False

    def leads(self) -> bool:
        """Whether this worker does the fleet's chores now; one that just won them reconciles first."""
        leading = self.leader.check()
        if leading and not self._leading:
            self._reconcile_pending = True
        self._leading = leading
        return leading

    def reconcile(self) -> list[ReconcileReport]:
        """Reconcile every metadata server now, if this worker is the elected one (else nothing: ``[]``)."""
        if not self.leads():
            return []
        self.reconcile_reports = self.sync.reconcile_all()
        self._reconcile_pending = any(r.error for r in self.reconcile_reports)
        self._reconciled_at = self.clock()
        return self.reconcile_reports

    def send_due_notices(self) -> tuple[list[Migration], list[str]]:
        """Claim and send the notices that are due (this worker's share); the ones sent, and the errors."""
        result = self.notices.send_due()
        return result.sent, result.errors

    def _clear(self, m: Migration, errors: list[str]) -> bool:
        try:
            return self.sync.clear(m)
        except HostEngineError as e:
            log.warning("migration_id=%s droplet_id=%s clearing the event failed: %s", m.id, m.droplet_id, e)
            errors.append(f"{m.id}: {e}")
            return False

    def clear_cancelled(self) -> tuple[list[Migration], list[str]]:
        cleared: list[Migration] = []
        errors: list[str] = []
        for m in pending_clears(self.store):
            if self._clear(m, errors):
                cleared.append(m)
        return cleared, errors

    def tick(self) -> TickResult:
        result = TickResult()
        leading = self.leads()
        due = self._reconciled_at is None or self.clock() - self._reconciled_at >= self.reconcile_every
        if leading and (self._reconcile_pending or due):
            self.reconcile()
            result.errors.extend(r.error for r in self.reconcile_reports if r.error)
        result.notified, errs = self.send_due_notices()
        result.errors.extend(errs)
        if leading:
            result.cleared, errs = self.clear_cancelled()
            result.errors.extend(errs)
            result.acked, errs = self.acks.read()
            result.errors.extend(errs)
        for step in [] if self.threads else self.steps:
            try:
                step.tick()
            except HostEngineError as e:
                log.warning("engine step %s failed: %s", type(step).__name__, e)
                result.errors.append(str(e))
        return result

    def run(self, *, max_ticks: int | None = None) -> int:
        """Reconcile, then tick until stopped (or ``max_ticks`` ticks). Returns the number of ticks run.

        A store outage is ridden out: the tick is retried with backoff (logged once, and once more when the
        store answers again) while the executor's attempts go on."""
        log.info(
            "engine starting (store %s, poll every %ss)", self.store.url, self.config.engine.poll_interval_s
        )
        if self.threads:
            return self._run_threads(max_ticks)
        ticks = self._ticks(max_ticks, self._sleep)
        log.info("engine stopped after %d ticks", ticks)
        return ticks

    def _ticks(self, max_ticks: int | None, sleep: Callable[[float], object]) -> int:
        self._outage.attempt(self.reconcile)
        ticks = 0
        while not self.stopping and (max_ticks is None or ticks < max_ticks):
            started = time.monotonic()
            self.on_tick(self._outage.attempt(self.tick), time.monotonic() - started)
            ticks += 1
            if self.stopping or (max_ticks is not None and ticks >= max_ticks):
                break
            sleep(self._outage.wait_s(self.config.engine.poll_interval_s))
        return ticks

    def _run_threads(self, max_ticks: int | None) -> int:
        """The loop on threads (``host-engine run``): a slow hypervisor or metadata server call stalls only
        its own loop, and SIGTERM is honoured within seconds whatever either is doing. Each loop finishes its
        current step when asked to stop (each change is one transaction); one still busy after
        ``STOP_JOIN_S`` is left behind (a daemon thread) and the caller shuts the executor down."""
        ticks: list[int] = []
        loops = [
            threading.Thread(
                target=lambda: ticks.append(self._ticks(max_ticks, self._stop.wait)),
                name="engine-notices",
                daemon=True,
            )
        ]
        if self.steps:
            loops.append(threading.Thread(target=self._steps_loop, name="engine-executor", daemon=True))
        for t in loops:
            t.start()
        # The main thread only waits (a signal handler runs between waits), until a signal, the tick limit,
        # or a step that cannot go on.
        while loops[0].is_alive() and not self._stop.wait(MAIN_WAIT_S):
            pass
        self._stop.set()
        deadline = time.monotonic() + STOP_JOIN_S
        for t in loops:
            t.join(max(0.0, deadline - time.monotonic()))
        busy = [t.name for t in loops if t.is_alive()]
        if busy:
            log.warning("stopping while %s finish a call in progress", ", ".join(busy))
        log.info("engine stopped after %d ticks", ticks[0] if ticks else 0)
        if self._step_error is not None:
            raise self._step_error
        return ticks[0] if ticks else 0

    def _steps_loop(self) -> None:
        """The executor's own loop: its ticks never wait for notices, acks or reconciliation. A store outage
        is logged once per step (the executor itself keeps its attempts going meanwhile)."""
        outages = [StoreOutage(f"engine step {type(step).__name__}") for step in self.steps]
        while not self._stop.is_set():
            for step, outage in zip(self.steps, outages, strict=True):
                try:
                    outage.attempt(step.tick)
                except HostEngineError as e:
                    log.warning("engine step %s failed: %s", type(step).__name__, e)
                except Exception as e:  # a step that cannot go on (e.g. another process drives the sim)
                    log.exception("engine step %s failed; stopping", type(step).__name__)
                    self._step_error = e
                    self._stop.set()
                    return
            self._stop.wait(self.config.engine.poll_interval_s)


class StoreOutage:
    """Rides out a store outage in a loop: ``attempt`` runs a step, turning a ``StoreError`` into a warning
    logged once per outage (and a note when the store answers again); ``wait_s`` is how long to sleep
    before the next try: the poll interval normally, else a doubling backoff with jitter (1 s .. 10 s)."""

    def __init__(self, what: str, *, rand: Callable[[], float] = random.random) -> None:
        self.what = what
        self.rand = rand
        self.down_since: float | None = None
        self._backoff_s = STORE_RETRY_MIN_S

    def attempt(self, step: Callable[[], object]) -> bool:
        try:
            step()
        except StoreError as e:
            if self.down_since is None:
                self.down_since = time.monotonic()
                self._backoff_s = STORE_RETRY_MIN_S
                log.warning("%s: store unreachable (%s); retrying with backoff", self.what, e)
            else:
                self._backoff_s = min(STORE_RETRY_MAX_S, self._backoff_s * 2)
                log.debug("%s: store still unreachable: %s", self.what, e)
            return False
        if self.down_since is not None:
            log.warning(
                "%s: store reachable again after %.0f s", self.what, time.monotonic() - self.down_since
            )
            self.down_since = None
        return True

    def wait_s(self, poll_s: float) -> float:
        if self.down_since is None:
            return poll_s
        return max(poll_s, self._backoff_s * (0.5 + self.rand()))
