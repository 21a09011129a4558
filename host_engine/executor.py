"""The executor: migrations from the store, driven one attempt at a time (``host_engine.attempt``).

- ``Executor`` claims due migrations and drives them, records progress and the log, and takes each failure
  down the path of DESIGN.md §3 (retry, another target, ``offline_required``, the offline copy); it also
  recovers migrations whose worker died. ``tick()`` is one engine-loop step.
- ``request_abort`` is ``host-engine abort``; ``timeline`` feeds ``host-engine report``.
- The Prometheus side is ``host_engine.executor_metrics``; the engine-loop steps that build an executor for
  ``host-engine run`` (sim or libvirt) are in ``host_engine.engine_steps``.

Many workers, one store (DESIGN.md §9; docs/host-engine.md "Running several workers"):

- A claim is taken under the fleet's limits (``[concurrency]``: fleet-wide, per source, per target), counted
  in the database under one lock, in the same transaction that starts the attempt (``Tx.claim_start``).
- Claims are leases on the database's clock: renewed every ``renew_every_s`` (one write for all of a
  worker's attempts); one not renewed for ``lease_s`` is taken over by another worker, which makes the
  droplet run on exactly one host (``HypervisorDriver.recover``) and records the attempt's end. A worker
  name is held by one live process (``host_engine.workers``), so a restarted worker takes its own attempts
  back at once.
- With a real clock each attempt (and each recovery) runs on its own thread: a hypervisor call that blocks
  stalls only its own migration, and ``tick()`` does only store work, bounded by ``max_concurrent``.
  With the simulated clock (``SimClock``: the caller advances time) ``tick()`` steps every attempt inline.
- A store outage is ridden out: attempts keep running under the controller, writes wait and are retried
  with backoff (logged once), and after the store returns no other worker's claim is taken over for one
  lease, so workers that could not renew meanwhile keep their attempts.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Protocol

from host_engine import requests as operator_requests
from host_engine.attempt import DEFAULT_TICK_S, Clock, MigrationResult, MigrationRun, Outcome, RealClock
from host_engine.config import (
    DEFAULT_LEASE_S,
    DEFAULT_MAX_CONCURRENT,
    DEFAULT_RENEW_EVERY_S,
    PlacementConfig,
)
from host_engine.controller import (
    NONCONVERGING,
    ControllerConfig,
    eta_s,
)
from host_engine.drivers.base import (
    DomainState,
    DriverError,
    HypervisorDriver,
    MigrationSpec,
    Phase,
    Progress,
    Recovered,
)
from host_engine.errors import Conflict, HostEngineError, StaleClaim, StoreError
from host_engine.executor_metrics import ExecutorMetrics
from host_engine.models import Migration
from host_engine.planner import plan_placement
from host_engine.retry import RetryConfig, RetryCounters, after_failure, backoff_s
from host_engine.samples import SAMPLES_KEY, SampleBuffer, sample_rows, with_samples
from host_engine.states import CANCELLABLE, Ack, LogKind, MigrationState
from host_engine.store import ClaimLimits, Store, Tx, offline_event_id

if TYPE_CHECKING:
    from host_engine.config import EngineConfig

log = logging.getLogger(__name__)


# --- The executor proper: migrations from the store, one worker among several ------------------------------

# Lease and renewal defaults: host_engine.config ([engine] lease, renew_every, max_concurrent).
# Write progress (stats) to the store every 5 s, and a log line whenever phase, round, throttle or disk limit
# changes: `status --watch` refreshes about that fast, and the store sees well under one write per second.
DEFAULT_PROGRESS_EVERY_S = 5.0
# An offline copy that failed this often needs an operator: the migration stays ``failed``.
DEFAULT_MAX_OFFLINE_ATTEMPTS = 3
# SIGTERM must end the process within 10 s: attempts get this long to abort (source untouched) before their
# claims are released for another worker (or this name's next process) to recover at once.
DEFAULT_SHUTDOWN_GRACE_S = 6.0
# Store retries after a failure: 1 s, doubling, at most this (and never longer than a renewal period).
STORE_RETRY_MIN_S = 1.0
STORE_RETRY_MAX_S = 30.0
# A migration waiting for its guest to shut down (offline copy) or for an operator is looked at again this
# often, not every tick: each look is a hypervisor call.
WAIT_RECHECK_S = 10.0
# Due migrations read per claim pass, per free slot (the rest wait for the next tick).
CANDIDATES_PER_SLOT = 2
# The abort reason of a worker's own shutdown: the migration goes back to the retry path, not cancelled.
SHUTDOWN_REASON = "worker shutting down"
# Keys in ``migrations.stats``.
ABORT_REQUEST_KEY = "abort_requested_by"
PROGRESS_KEY = "progress"
LAST_ATTEMPT_KEY = "last_attempt"


@dataclass(frozen=True)
class ExecutorConfig:
    """One worker's executor settings. ``for_engine`` builds it from the engine's config."""

    worker: str
    max_concurrent: int = DEFAULT_MAX_CONCURRENT
    tick_s: float = DEFAULT_TICK_S
    renew_every_s: float = DEFAULT_RENEW_EVERY_S
    lease_s: float = DEFAULT_LEASE_S
    progress_every_s: float = DEFAULT_PROGRESS_EVERY_S
    max_offline_attempts: int = DEFAULT_MAX_OFFLINE_ATTEMPTS
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    # Claim only these migrations (``host-engine migrate --now`` runs its own, not whatever else is due;
    # ``for_engine`` then retries them seconds apart: ``RetryConfig.right_away``).
    only: frozenset[str] | None = None
    # The fleet's limits, checked in the store at claim time across every worker ([concurrency]).
    limits: ClaimLimits = field(default_factory=ClaimLimits)
    # Each attempt on its own thread; None: when the clock is real (time passes without the caller).
    threads: bool | None = None
    shutdown_grace_s: float = DEFAULT_SHUTDOWN_GRACE_S

    @classmethod
    def for_engine(
        cls, config: EngineConfig, *, only: frozenset[str] | None = None, tick_s: float | None = None
    ) -> ExecutorConfig:
        """The executor of ``host-engine run`` / ``migrate --now``: worker name, lease, renewal and
        per-worker concurrency from ``[engine]``, the fleet's limits from ``[concurrency]``, the downtime
        budget from ``[controller]``; the controller ticks once per engine poll."""
        e, sched = config.engine, config.schedule
        # ``migrate --now`` runs beside any ``host-engine run`` of the same name: it must not pass for that
        # worker (whose recovery would take its attempt for an orphan), so it works under a name of its own.
        worker = config.worker_id if only is None else f"{config.worker_id}/migrate-{os.getpid()}"
        return cls(
            # ``migrate --now``: the operator waits at the terminal, so a retry comes seconds later.
            retry=RetryConfig() if only is None else RetryConfig.right_away(),
            worker=worker,
            max_concurrent=e.max_concurrent,
            tick_s=e.poll_interval_s if tick_s is None else tick_s,
            renew_every_s=e.renew_every_s,
            lease_s=e.lease_s,
            controller=config.controller,
            only=only,
            limits=ClaimLimits(sched.max_parallel, sched.max_per_source, sched.max_per_target),
        )


class ExecutorHooks(Protocol):
    """What the engine does around a migration's life (metadata servers, metrics). Called after the store
    committed; an exception is logged, never undoes the store."""

    def completed(self, migration: Migration) -> None:
        """Register on the target's metadata server, remove from the source's, clear the flag."""

    def retry_scheduled(self, migration: Migration) -> None:
        """The guest keeps reading live_migrate (same event id), with the new not_before."""

    def offline_required(self, migration: Migration) -> None:
        """The guest now reads offline_migrate under a new event id."""

    def cancelled(self, migration: Migration) -> None:
        """An operator aborted it: clear the flag."""


class NoHooks:
    def completed(self, migration: Migration) -> None:
        pass

    def retry_scheduled(self, migration: Migration) -> None:
        pass

    def offline_required(self, migration: Migration) -> None:
        pass

    def cancelled(self, migration: Migration) -> None:
        pass


#: Picks another target for a migration, avoiding the given hosts; None when there is none.
TargetChooser = Callable[[Migration, frozenset[str]], str | None]


def placement_chooser(store: Store, config: PlacementConfig) -> TargetChooser:
    """A ``TargetChooser`` from the placement filters and weighers (DESIGN.md §6): the best host for the
    droplet that is not to be avoided, among the chosen one and its runners-up; None when none fits."""

    def choose(m: Migration, avoid: frozenset[str]) -> str | None:
        with store.begin(readonly=True) as tx:
            droplet = tx.get_droplet(m.droplet_id)
            plan = plan_placement(tx, tx.get_host(m.source_host), [droplet], config)
        c = plan.choice(droplet.id)
        ranked = ([c.target] if c.target else []) + [host for host, _score in c.runners_up]
        return next((h for h in ranked if h not in avoid), None)

    return choose


@dataclass(frozen=True)
class Finished:
    """An attempt that ended, and the state its migration is in afterwards."""

    migration_id: str
    attempt: int
    result: MigrationResult
    state: MigrationState


@dataclass
class _Active:
    """A migration this worker drives (``run``) or recovers (``run is None``)."""

    migration: Migration
    run: MigrationRun | None
    offline: bool
    last_write_s: float
    last_logged: Progress | None = None
    lost_claim: str | None = None
    abort_requested: str | None = None
    # The attempt's end, once known, until the store has recorded it.
    result: MigrationResult | None = None
    extra: dict[str, object] = field(default_factory=dict)
    thread: threading.Thread | None = None
    # Every progress sample of the attempt this worker drives (None: a recovery), written with its progress.
    samples: SampleBuffer | None = None


def attempt_id(migration_id: str, attempt: int) -> str:
    """The driver-side id of one attempt: each retry is a new job on the hypervisors."""
    return f"{migration_id}.{attempt}"


def progress_dict(p: Progress) -> dict[str, object]:
    """A Progress as plain JSON values (stats, log data, ``--json``)."""
    return {
        "phase": p.phase.value,
        "elapsed_s": round(p.elapsed_s, 2),
        "round": p.round,
        "disk_total_bytes": p.disk_total_bytes,
        "disk_remaining_bytes": p.disk_remaining_bytes,
        "memory_total_bytes": p.memory_total_bytes,
        "memory_remaining_bytes": p.memory_remaining_bytes,
        "disk_dirty_rate_bps": round(p.disk_dirty_rate_bps),
        "memory_dirty_rate_bps": round(p.memory_dirty_rate_bps),
        "transfer_rate_bps": round(p.transfer_rate_bps),
        "disk_write_limit_bps": p.disk_write_limit_bps,
        "memory_throttle_pct": p.memory_throttle_pct,
        "downtime_ms": p.downtime_ms,
        "bytes_transferred": p.bytes_transferred,
        "eta_s": None if (eta := eta_s(p)) is None else round(eta, 1),
    }


def describe(p: Progress) -> str:
    """One line a person can follow."""
    left_mib = (p.disk_remaining_bytes + p.memory_remaining_bytes) / (1024 * 1024)
    parts = [
        f"{p.phase.value}",
        f"round {p.round}",
        f"{left_mib:.0f} MiB left",
        f"{p.transfer_rate_bps / (1024 * 1024):.0f} MiB/s",
    ]
    if p.memory_throttle_pct:
        parts.append(f"throttle {p.memory_throttle_pct} %")
    if p.disk_write_limit_bps is not None:
        parts.append(f"disk limit {p.disk_write_limit_bps / (1024 * 1024):.0f} MiB/s")
    if p.downtime_ms is not None:
        parts.append(f"downtime {p.downtime_ms:.0f} ms")
    elif p.phase in (Phase.DISK, Phase.MEMORY):
        eta = eta_s(p)
        parts.append("not converging yet" if eta is None else f"ETA {eta:.0f} s")
    return ", ".join(parts)


class Executor:
    """Claims due migrations from the store and drives them through a hypervisor driver under the controller.

    The engine's loop calls ``tick()`` and then sleeps ``config.tick_s``; ``run_until_idle()`` does both
    until nothing runs (``host-engine migrate --now``, tests). Several processes may run against one
    PostgreSQL (see the module docstring): every write after the claim proves the claim still holds
    (``worker=``). On SQLite, one writer at a time.
    """

    def __init__(
        self,
        store: Store,
        hypervisor: HypervisorDriver,
        config: ExecutorConfig,
        clock: Clock,
        *,
        hooks: ExecutorHooks | None = None,
        choose_target: TargetChooser | None = None,
        rand: Callable[[], float] | None = None,
        metrics: ExecutorMetrics | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.hypervisor = hypervisor
        self.config = config
        self.clock = clock
        self.hooks: ExecutorHooks = hooks or NoHooks()
        self.choose_target = choose_target
        self.rand = rand or random.Random().random  # noqa: S311 - jitter, not secrets
        self.threaded = config.threads if config.threads is not None else isinstance(clock, RealClock)
        # Wall time for store retries and the post-outage hold-off (the sim clock may stand still).
        self.monotonic = monotonic
        self.active: dict[str, _Active] = {}
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._done: list[Finished] = []
        # Set when an attempt (or a recovery) of this worker ended: wakes ``wait`` (``migrate --now``).
        self._ended = threading.Event()
        self._last_renew_s: float | None = None
        self._last_recover_s: float | None = None
        self._waiting: dict[str, float] = {}  # migration id -> when to look at it again (clock)
        self._waiting_logged: set[str] = set()
        # Store outage bookkeeping (monotonic seconds).
        self._store_down_since: float | None = None
        self._store_retry_at = 0.0
        self._store_retry_s = STORE_RETRY_MIN_S
        self._no_takeover_until = 0.0

    # ---- the loop ----------------------------------------------------------------------------------------

    def tick(self) -> list[Finished]:
        """Renew claims, record finished attempts, recover orphans (now and then), claim what is due within
        the limits; inline (simulated clock), also advance every attempt by one controller step.

        A store outage does not raise: store work waits (retried with backoff) while attempts go on."""
        if self._store_due():
            try:
                self._store_work()
            except StoreError as e:
                self._store_failed(e)
            else:
                self._store_ok()
        if not self.threaded:
            for a in self._snapshot():
                if a.result is None and a.run is not None:
                    self._advance_inline(a)
        return self._drain_done()

    def advance(self) -> list[Finished]:
        """Inline (simulated clock): step every attempt once, recording those that end, without the store
        work of :meth:`tick` (renewals, recovery, claims). A simulation running faster than real time calls
        this between ticks, so the store sees claims at a real worker's pace, not at every simulated step."""
        if not self.threaded:
            for a in self._snapshot():
                if a.result is None and a.run is not None:
                    self._advance_inline(a)
        return self._drain_done()

    def run_until_idle(self, *, max_s: float | None = None) -> list[Finished]:
        """Tick and sleep on the clock until nothing is running (or ``max_s`` passes)."""
        started = self.clock.now()
        done = self.tick()
        while self.active and (max_s is None or self.clock.now() - started < max_s):
            self.clock.sleep(self.config.tick_s)
            done += self.tick()
        return done

    def wait(self, timeout_s: float, sleep: Callable[[float], None] | None = None) -> None:
        """Pause between two ticks of a caller's loop: ``timeout_s``, or less when an attempt ends first.

        Threaded, the attempts end on their own threads, and a caller that waits for one (``migrate --now``)
        ticks again the moment it is recorded instead of a full poll interval later. Inline, nothing can end
        before the next tick, so this is ``sleep`` (default: the executor's clock)."""
        if not self.threaded:
            (sleep or self.clock.sleep)(timeout_s)
            return
        self._ended.wait(timeout_s)
        # An end after this clear sets it again (the next wait returns at once); one before it is already in
        # the store, where the caller's next look finds it.
        self._ended.clear()

    def shutdown(self) -> list[Finished]:
        """Stop this worker: abort its attempts (sources untouched) and hand them to the retry path.

        Threaded, attempts get ``shutdown_grace_s`` to end; the claims of any still going (a hypervisor
        call that does not return, a store that does not answer) are released, so another worker, or this
        name's next process, recovers them at once instead of after the lease."""
        self._stopping.set()
        for a in self._snapshot():
            a.abort_requested = a.abort_requested or SHUTDOWN_REASON
        if not self.threaded:
            for a in self._snapshot():
                if a.result is None and a.run is not None:
                    self._advance_inline(a)
                elif a.result is not None:
                    self._record(a)
            return self._drain_done()
        deadline = self.monotonic() + self.config.shutdown_grace_s
        for a in self._snapshot():
            if a.thread is not None:
                a.thread.join(max(0.0, deadline - self.monotonic()))
        left = [a.migration.id for a in self._snapshot() if not a.lost_claim]
        if left:
            self._release(left)
        return self._drain_done()

    def _release(self, migration_ids: list[str]) -> None:
        try:
            with self.store.begin() as tx:
                for mid in migration_ids:
                    try:
                        tx.release_claim(mid, self.config.worker)
                    except StaleClaim:
                        continue
            log.warning(
                "released %s unfinished attempt(s) for recovery by the next worker: %s",
                len(migration_ids),
                ", ".join(migration_ids),
            )
        except HostEngineError as e:
            log.error(
                "could not release %s (%s): another worker takes them over when the lease expires",
                ", ".join(migration_ids),
                e,
            )

    def _snapshot(self) -> list[_Active]:
        with self._lock:
            return list(self.active.values())

    def _drain_done(self) -> list[Finished]:
        with self._lock:
            done, self._done = self._done, []
        return done

    def _finished(self, f: Finished) -> None:
        with self._lock:
            self._done.append(f)

    # ---- the store: work, outages ------------------------------------------------------------------------

    def _store_due(self) -> bool:
        return self._store_down_since is None or self.monotonic() >= self._store_retry_at

    def _store_work(self) -> None:
        now = self.clock.now()
        if self._last_renew_s is None or now - self._last_renew_s >= self.config.renew_every_s:
            self._renew()
            self._last_renew_s = now
        for a in self._snapshot():
            if a.result is not None and a.thread is None:
                self._record(a)
        if self._last_recover_s is None or now - self._last_recover_s >= self.config.renew_every_s:
            self._recover()
            self._last_recover_s = now
        self._claim_due()

    def _store_failed(self, e: StoreError) -> None:
        now = self.monotonic()
        if self._store_down_since is None:
            self._store_down_since = now
            self._store_retry_s = STORE_RETRY_MIN_S
            log.warning(
                "store unreachable (%s): %s attempt(s) keep running; retrying with backoff",
                e,
                len(self.active),
            )
        else:
            log.debug("store still unreachable: %s", e)
            cap = min(STORE_RETRY_MAX_S, max(STORE_RETRY_MIN_S, self.config.renew_every_s))
            self._store_retry_s = min(cap, self._store_retry_s * 2)
        self._store_retry_at = now + self._store_retry_s * (0.5 + self.rand())

    def _store_ok(self) -> None:
        if self._store_down_since is None:
            return
        now = self.monotonic()
        log.warning(
            "store reachable again after %.0f s; not taking over other workers' attempts for %.0f s",
            now - self._store_down_since,
            self.config.lease_s,
        )
        self._store_down_since = None
        # Other workers could not renew either: give them a full lease to do so before taking anything over.
        self._no_takeover_until = now + self.config.lease_s

    def _renew(self) -> None:
        """Renew every claim this worker holds (one write), and learn which it lost and which an operator
        asked to abort."""
        mine = {a.migration.id: a for a in self._snapshot() if not a.lost_claim}
        if not mine:
            return
        with self.store.begin() as tx:
            held = tx.renew_claims(self.config.worker, mine)
        for mid, a in mine.items():
            m = held.get(mid)
            if m is None:
                a.lost_claim = "claim lost: another worker took this migration over"
                log.error("migration_id=%s: %s; stopping this attempt", mid, a.lost_claim)
                continue
            requested = m.stats.get(ABORT_REQUEST_KEY)
            if requested and not a.abort_requested:
                a.abort_requested = f"aborted by {requested}"
            self._pick_up_force(a, m)

    # ---- starting ----------------------------------------------------------------------------------------

    def claim_due(self) -> list[Finished]:
        """Claim and start what is due, up to ``max_concurrent`` here and within the fleet's limits (checked
        in the store, under its claim lock, by ``Tx.claim_start``). A migration that must wait (its guest
        has not shut down for an offline copy yet) is skipped unclaimed, so it never blocks the ones behind
        it. Returns the attempts that have ended by now (inline: those that could not even start)."""
        self._claim_due()
        return self._drain_done()

    def _claim_due(self) -> None:
        free = self.config.max_concurrent - len(self.active)
        if free <= 0 or self._stopping.is_set():
            return
        limit = free * CANDIDATES_PER_SLOT
        # Migrations that had to wait are left out until the rest of the due backlog has been looked at, so
        # a long queue of waiting ones never starves a startable one behind it; then the ones whose recheck
        # time came are looked at again (those no longer due are forgotten).
        with self.store.begin(readonly=True) as tx:
            candidates = tx.claim_candidates(
                lease_s=self.config.lease_s,
                limits=self.config.limits,
                limit=limit,
                only=self.config.only,
                exclude=set(self.active) | set(self._waiting),
            )
            now = self.clock.now()
            recheck = {mid for mid, at in self._waiting.items() if at <= now}
            if self.config.only is not None:
                recheck &= self.config.only
            if len(candidates) < limit and recheck:
                again = tx.claim_candidates(
                    lease_s=self.config.lease_s,
                    limits=self.config.limits,
                    limit=limit - len(candidates),
                    only=recheck,
                    exclude=set(self.active),
                )
                if len(again) < limit - len(candidates):  # every due one was returned: forget the others
                    for mid in recheck - {m.id for m in again}:
                        self._waiting.pop(mid, None)
                candidates += again
        for m in candidates:
            if free <= 0:
                break
            power = self._power(m)
            if power is None:
                continue
            offline = self._wants_offline(m, power)
            with self.store.begin() as tx:
                started = tx.claim_start(
                    m.id,
                    self.config.worker,
                    offline=offline,
                    lease_s=self.config.lease_s,
                    limits=self.config.limits,
                )
            if started is None:  # another worker was faster, or a limit filled up meanwhile
                continue
            free -= 1
            log.info("migration_id=%s droplet_id=%s attempt %s started", m.id, m.droplet_id, started.attempt)
            self._launch(started, offline)

    @staticmethod
    def _wants_offline(m: Migration, power: DomainState) -> bool:
        return (
            m.offline
            or m.state is MigrationState.OFFLINE_REQUIRED
            or m.ack == Ack.OFFLINE
            or power is DomainState.SHUT_OFF
        )

    def _power(self, m: Migration) -> DomainState | None:
        """The droplet's power state on its source, or None when the migration must wait: the droplet is
        absent (an operator must look), or an offline copy waits for the guest, which was told
        (offline_migrate, or it acknowledged offline), to shut itself down."""
        try:
            power = self.hypervisor.domain_state(m.source_host, m.droplet_id)
        except DriverError as e:
            log.warning("migration_id=%s: cannot read %s on %s: %s", m.id, m.droplet_id, m.source_host, e)
            self._waiting[m.id] = self.clock.now() + WAIT_RECHECK_S
            return None
        if power is not DomainState.ABSENT and not (
            self._wants_offline(m, power) and power is not DomainState.SHUT_OFF
        ):
            self._waiting.pop(m.id, None)
            self._waiting_logged.discard(m.id)
            return power
        self._waiting[m.id] = self.clock.now() + WAIT_RECHECK_S
        if m.id not in self._waiting_logged:
            note = (
                f"{m.droplet_id} is not on {m.source_host}: operator needed"
                if power is DomainState.ABSENT
                else f"waiting for {m.droplet_id} to shut down for the offline copy"
            )
            self.store.append_log(m.id, LogKind.WAIT, note, droplet_id=m.droplet_id)
            log.warning("migration_id=%s: %s", m.id, note)
            self._waiting_logged.add(m.id)
        return None

    def _launch(self, m: Migration, offline: bool) -> None:
        run = MigrationRun(self.hypervisor.migration(self._spec(m)), self.config.controller, self.clock)
        a = _Active(m, run, offline, self.clock.now(), samples=SampleBuffer(m.attempt))
        run.on_progress = lambda p: self._on_progress(a, p)
        run.should_abort = lambda: a.lost_claim or a.abort_requested
        if self._stopping.is_set():  # claimed while shutting down: stop it at once, source untouched
            a.abort_requested = SHUTDOWN_REASON
        with self._lock:
            self.active[m.id] = a
        if self.threaded:
            self._spawn(a, self._attempt_main, f"attempt {m.id}")
        elif not run.begin():
            a.result = run.result
            self._record(a)

    def _spawn(self, a: _Active, target: Callable[[_Active], None], name: str) -> None:
        a.thread = threading.Thread(target=self._thread_main, args=(a, target), name=name, daemon=True)
        a.thread.start()

    def _spec(self, m: Migration) -> MigrationSpec:
        with self.store.begin(readonly=True) as tx:
            droplet = tx.get_droplet(m.droplet_id)
            source = tx.get_host(m.source_host)
            target = tx.get_host(m.target_host)
        return MigrationSpec(
            migration_id=attempt_id(m.id, m.attempt),
            droplet_id=m.droplet_id,
            source_host=m.source_host,
            target_host=m.target_host,
            source_uri=source.hypervisor_uri,
            target_uri=target.hypervisor_uri,
            vcpus=droplet.vcpus,
            memory_bytes=droplet.memory_bytes,
            disk_bytes=droplet.disk_bytes,
            offline=m.offline,
            power_on_after=m.power_on_after,
            options=operator_requests.bandwidth_options(m.stats),
        )

    # ---- running -----------------------------------------------------------------------------------------

    def _thread_main(self, a: _Active, target: Callable[[_Active], None]) -> None:
        """An attempt's (or a recovery's) own thread: drive it, record its end, leave ``active``."""
        try:
            target(a)
            self._record_until_stored(a)
        except Exception:
            # The row stays running under this worker's claim: recovery (this name's) finishes it.
            log.exception("migration_id=%s: attempt thread failed", a.migration.id)
        finally:
            with self._lock:
                self.active.pop(a.migration.id, None)
            self._ended.set()

    def _attempt_main(self, a: _Active) -> None:
        run = a.run
        if run is None:
            return
        if run.begin():
            while run.step() is None:
                run.pause(self.config.tick_s)  # the job's end wakes it
        a.result = run.result

    def _advance_inline(self, a: _Active) -> None:
        if a.run is None:
            return
        a.result = a.run.result or a.run.step()
        if a.result is not None:
            self._record(a)

    def _on_progress(self, a: _Active, p: Progress) -> None:
        """Record progress, pick up an operator's abort: at most every few seconds, and on every change of
        phase, round, throttle or disk limit; each sample goes into the attempt's ``SampleBuffer``, written
        with the progress (no transaction of its own). A store that does not answer only skips the write."""
        now = self.clock.now()
        values = progress_dict(p)
        if a.samples is not None:
            a.samples.add(values)
        last = a.last_logged
        changed = last is None or (p.phase, p.round, p.memory_throttle_pct, p.disk_write_limit_bps) != (
            last.phase,
            last.round,
            last.memory_throttle_pct,
            last.disk_write_limit_bps,
        )
        if not changed and now - a.last_write_s < self.config.progress_every_s:
            return
        mid = a.migration.id
        try:
            with self.store.begin() as tx:
                m = tx.renew_claim(mid, self.config.worker)
                stats = {**m.stats, PROGRESS_KEY: values}
                if a.samples is not None:
                    stats[SAMPLES_KEY] = with_samples(m.stats, a.samples)
                tx.update_migration(mid, stats=stats)
                if changed:
                    tx.append_log(mid, LogKind.PROGRESS, describe(p), droplet_id=m.droplet_id, data=values)
        except StaleClaim as e:
            log.error("migration_id=%s: %s; stopping this attempt", mid, e)
            a.lost_claim = f"claim lost: {e}"
            return
        except HostEngineError as e:  # the store is unreachable: keep migrating, write on a later tick
            log.debug("migration_id=%s: progress not recorded: %s", mid, e)
            return
        requested = m.stats.get(ABORT_REQUEST_KEY)
        if requested and not a.abort_requested:
            a.abort_requested = f"aborted by {requested}"
        self._pick_up_force(a, m)
        a.last_write_s = now
        a.last_logged = p

    @staticmethod
    def _pick_up_force(a: _Active, m: Migration) -> None:
        """An operator's force-complete of this attempt: the run switches over now (``force_switchover``);
        who and why go into the attempt's record."""
        forced = operator_requests.forced_now(m)
        if forced is None or a.run is None or a.run.forced is not None or a.offline:
            return
        a.run.force_switchover(forced.describe())
        a.extra.update(forced_by=forced.by, force_reason=forced.reason)
        log.warning("migration_id=%s: %s; switching over now", m.id, forced.describe())

    # ---- ending ------------------------------------------------------------------------------------------

    def _record(self, a: _Active) -> bool:
        """Record an ended attempt in the store. True when done with it (recorded, or not ours to record);
        False when the store could not be reached (the caller tries again later)."""
        result = a.result
        if result is None:
            return False
        mid = a.migration.id
        if a.lost_claim:
            # Another worker took over (our lease expired): it owns the store row and recovery.
            self._drop(a, Finished(mid, a.migration.attempt, result, a.migration.state))
            return True
        try:
            finished = self._finish(
                a.migration,
                a.offline,
                result,
                operator_abort=a.abort_requested,
                extra=a.extra,
                samples=a.samples,
            )
        except StoreError as e:
            log.debug("migration_id=%s: outcome not recorded yet: %s", mid, e)
            return False
        except HostEngineError:
            # The hypervisors are consistent (one host runs the droplet); the store refused the record. The
            # row stays running under our claim and recovery finishes it from what the hypervisor reports.
            log.exception("migration_id=%s: outcome not recorded; recovery will", mid)
            finished = Finished(mid, a.migration.attempt, result, a.migration.state)
        self._drop(a, finished)
        return True

    def _drop(self, a: _Active, finished: Finished) -> None:
        with self._lock:
            self.active.pop(a.migration.id, None)
            self._done.append(finished)
        self._ended.set()

    def _record_until_stored(self, a: _Active) -> None:
        """On an attempt's thread: record its end, retrying with backoff while the store is unreachable
        (until shutdown's grace runs out: then the claim is released for the next worker to recover)."""
        wait_s = STORE_RETRY_MIN_S
        while not self._record(a):
            if self._stopping.wait(wait_s * (0.5 + self.rand())) and self._stopping.is_set():
                # Shutting down: one last try, then leave it to recovery.
                self._record(a)
                return
            wait_s = min(STORE_RETRY_MAX_S, wait_s * 2)

    def _finish(
        self,
        m: Migration,
        offline: bool,
        result: MigrationResult,
        *,
        operator_abort: str | None,
        extra: dict[str, object] | None = None,
        samples: SampleBuffer | None = None,
    ) -> Finished:
        worker = self.config.worker
        attempt_stats = {"attempt": m.attempt, "offline": offline, **result.summary(), **(extra or {})}
        # The samples since the last progress write (the attempt's last ones) go with its outcome.
        last_samples = {} if samples is None else {SAMPLES_KEY: with_samples(m.stats, samples)}
        if result.outcome is Outcome.COMPLETED:
            done = self.store.complete(
                m.id,
                worker=worker,
                stats={LAST_ATTEMPT_KEY: attempt_stats, **last_samples},
                message=f"completed: {m.droplet_id} now on {m.target_host} "
                f"(downtime {_ms(result.downtime_ms)}, {result.duration_s:.1f} s)",
            )
            log.info("migration_id=%s droplet_id=%s completed on %s", m.id, m.droplet_id, m.target_host)
            self._observe(result)
            self._hook("completed", done)
            return Finished(m.id, m.attempt, result, done.state)

        counters = RetryCounters.from_stats(m.stats).after(
            nonconverging=result.abort_reason in NONCONVERGING,
            offline=offline,
            failed_target=m.target_host if result.target_at_fault else None,
        )
        stats = {
            **m.stats,
            **last_samples,
            LAST_ATTEMPT_KEY: attempt_stats,
            **counters.to_stats(),
        }
        stats.pop(ABORT_REQUEST_KEY, None)
        reason = result.reason or result.outcome.value
        log.warning(
            "migration_id=%s droplet_id=%s attempt %s failed: %s", m.id, m.droplet_id, m.attempt, reason
        )
        cancel = bool(operator_abort) and operator_abort != SHUTDOWN_REASON
        # Decided before the transaction: choosing a target reads the store (placement) on its own.
        target = m.target_host
        if result.target_at_fault and self.choose_target is not None and not cancel:
            target = self.choose_target(m, counters.failed_targets | {m.source_host}) or target
        with self.store.begin() as tx:
            now = tx.now
            failed = tx.transition(
                m.id,
                MigrationState.FAILED,
                worker=worker,
                last_error=reason,
                stats=stats,
                message=f"attempt {m.attempt} failed: {reason}; {m.droplet_id} still on {m.source_host}",
                data=attempt_stats,
            )
            if cancel:
                nxt = tx.transition(m.id, MigrationState.CANCELLED, message=operator_abort or "")
                hook = "cancelled"
            elif offline:
                nxt, hook = self._after_offline_failure(tx, failed, now, target, counters)
            else:
                # Not the guest's, the target's nor the hypervisor's doing: the next worker may go at once.
                worker_stopped = operator_abort == SHUTDOWN_REASON or "recovered_by" in (extra or {})
                nxt, hook = self._after_live_failure(
                    tx, failed, now, result, counters, target, at_once=worker_stopped
                )
        self._observe(result)
        if hook:
            self._hook(hook, nxt)
        return Finished(m.id, m.attempt, result, nxt.state)

    def _observe(self, result: MigrationResult) -> None:
        if self.metrics is not None:
            self.metrics.observe(result)

    def _after_live_failure(
        self,
        tx: Tx,
        m: Migration,
        now: datetime,
        result: MigrationResult,
        counters: RetryCounters,
        other_target: str,
        *,
        at_once: bool = False,
    ) -> tuple[Migration, str]:
        decision = after_failure(
            attempt=m.attempt,
            max_attempts=m.max_attempts,
            target_at_fault=result.target_at_fault,
            abort_reason=result.abort_reason.value if result.abort_reason else None,
            nonconverging_attempts=counters.nonconverging_attempts,
            config=self.config.retry,
            rand=self.rand,
        )
        not_before = now + timedelta(seconds=0.0 if at_once and not decision.offline else decision.delay_s)
        if decision.offline:
            nxt = tx.transition(
                m.id,
                MigrationState.OFFLINE_REQUIRED,
                message=f"{decision.reason}; offline copy not before {not_before.isoformat()}",
                event_id=offline_event_id(m.id),
                notice_at=now,
                not_before=not_before,
                deadline=not_before,
                offline=True,
                ack=None,
                claimed_by=None,
                claimed_at=None,
            )
            return nxt, "offline_required"
        target = other_target if decision.other_target else m.target_host
        nxt = tx.transition(
            m.id,
            MigrationState.NOTIFIED,
            message=f"{decision.reason}: attempt {m.attempt + 1} to {target} "
            f"not before {not_before.isoformat()}",
            target_host=target,
            not_before=not_before,
            deadline=max(m.deadline, not_before),
            claimed_by=None,
            claimed_at=None,
        )
        return nxt, "retry_scheduled"

    def _after_offline_failure(
        self, tx: Tx, m: Migration, now: datetime, target: str, counters: RetryCounters
    ) -> tuple[Migration, str]:
        if counters.offline_attempts >= self.config.max_offline_attempts:
            tx.update_migration(
                m.id,
                claimed_by=None,
                claimed_at=None,
                message="offline copy failed too often: operator needed (retry or cancel)",
                log_kind=LogKind.ALERT,
            )
            return tx.get_migration(m.id), ""
        not_before = now + timedelta(seconds=backoff_s(m.attempt, self.config.retry, self.rand))
        nxt = tx.transition(
            m.id,
            MigrationState.OFFLINE_REQUIRED,
            message=f"offline copy to {target} again not before {not_before.isoformat()}",
            target_host=target,
            not_before=not_before,
            claimed_by=None,
            claimed_at=None,
        )
        return nxt, "offline_required"

    def _hook(self, name: str, m: Migration) -> None:
        try:
            getattr(self.hooks, name)(m)
        except Exception:  # a metadata server being down must not undo a committed migration
            log.exception("migration_id=%s: %s hook failed", m.id, name)

    # ---- recovery ----------------------------------------------------------------------------------------

    def recover(self) -> list[Finished]:
        """Take over running migrations nobody supervises: unclaimed (released at a shutdown), this
        worker's own from before a restart (its name is held by one live process, so they are orphans),
        or another worker's whose lease expired (by the store's clock; never for one lease after a store
        outage). Each is claimed, then the hypervisor makes the droplet run on exactly one host
        (``HypervisorDriver.recover``: adopted if the switchover happened, else aborted with the source
        untouched), and that is recorded as the attempt's end. Threaded, each on its own thread.
        Returns the attempts that have ended by now."""
        self._recover()
        return self._drain_done()

    def _recover(self) -> None:
        worker = self.config.worker
        if self._stopping.is_set():
            return
        hold_off = self.monotonic() < self._no_takeover_until
        with self.store.begin(readonly=True) as tx:
            orphans = tx.orphans(worker, lease_s=self.config.lease_s)
        for candidate in orphans:
            if candidate.id in self.active:
                continue
            if self.config.only is not None and candidate.id not in self.config.only:
                continue
            if hold_off and candidate.claimed_by not in (None, worker):
                continue
            claimed = self.store.claim(
                worker,
                states=(candidate.state,),
                lease_s=self.config.lease_s,
                migration_id=candidate.id,
                include_own=True,
            )
            if not claimed:
                continue
            m = claimed[0]
            a = _Active(m, None, m.state is MigrationState.OFFLINE_RUNNING, self.clock.now())
            requested = m.stats.get(ABORT_REQUEST_KEY)
            # An operator's abort of an orphaned attempt still cancels it (not a retry).
            a.abort_requested = f"aborted by {requested}" if requested else None
            a.extra = {"recovered_by": worker, "previous_worker": candidate.claimed_by}
            with self._lock:
                self.active[m.id] = a
            if self.threaded:
                self._spawn(a, self._recover_main, f"recover {m.id}")
                continue
            self._recover_main(a)
            if a.result is None or not self._record(a):
                with self._lock:  # try again at the next recovery pass
                    self.active.pop(m.id, None)

    def _recover_main(self, a: _Active) -> None:
        """Ask the hypervisor where the droplet runs (cancelling what is left of the job), and turn the
        answer into the attempt's result: the recorded progress supplies what the dead worker measured."""
        m = a.migration
        try:
            answer = self.hypervisor.recover(self._spec(m))
        except (HostEngineError, DriverError):
            log.exception("migration_id=%s: recovery failed; will try again", m.id)
            return
        where, reported = _recovered(answer)
        log.warning(
            "migration_id=%s droplet_id=%s: attempt %s of %s recovered by %s; droplet runs on %s",
            m.id,
            m.droplet_id,
            m.attempt,
            m.claimed_by if a.extra.get("previous_worker") is None else a.extra["previous_worker"],
            self.config.worker,
            where,
        )
        a.result = _recovered_result(m, where, reported, now=self.store.now())


def _ms(downtime_ms: float | None) -> str:
    return "unknown" if downtime_ms is None else f"{downtime_ms:.0f} ms"


def _recovered(answer: str | Recovered) -> tuple[str, dict[str, object]]:
    """``HypervisorDriver.recover``'s answer: the host that runs the droplet, and what the hypervisor still
    knew of the attempt (``Recovered.stats``), when it says."""
    if isinstance(answer, Recovered):
        return answer.host, dict(answer.stats)
    return answer, {}


def _recovered_result(
    m: Migration, where: str, reported: dict[str, object], *, now: datetime
) -> MigrationResult:
    """The end of an attempt its worker did not live to record. Completed when the droplet runs on the
    target, with the real numbers: what the driver reports, else the progress the worker last recorded."""
    completed = where == m.target_host
    last = m.stats.get(PROGRESS_KEY)
    progress: dict[str, object] = dict(last) if isinstance(last, dict) else {}
    merged = {**progress, **reported}

    def number(key: str) -> float | None:
        value = merged.get(key)
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

    duration = number("duration_s")
    if duration is None and m.started_at is not None:
        duration = max(0.0, (now - m.started_at).total_seconds())
    return MigrationResult(
        outcome=Outcome.COMPLETED if completed else Outcome.FAILED,
        reason=None if completed else "worker died mid-attempt; source resumed, target cleaned",
        abort_reason=None,
        target_at_fault=False,
        duration_s=duration or 0.0,
        downtime_ms=number("downtime_ms") if completed else None,
        throttle_pct_s=number("throttle_pct_s") or 0.0,
        disk_limit_s=number("disk_limit_s") or 0.0,
        bytes_transferred=int(number("bytes_transferred") or 0),
        rounds=int(number("rounds") or number("round") or 0),
    )


def request_abort(store: Store, migration_id: str, *, by: str) -> Migration:
    """``host-engine abort MIGRATION``: a running one is stopped by its worker within a few seconds (source
    untouched, then ``cancelled``); one not yet running is cancelled at once."""
    with store.begin() as tx:
        m = tx.get_migration(migration_id, for_update=True)
        if m.state in (MigrationState.RUNNING, MigrationState.OFFLINE_RUNNING):
            return tx.update_migration(
                migration_id,
                stats={**m.stats, ABORT_REQUEST_KEY: by},
                message=f"abort requested by {by}",
                log_kind=LogKind.ABORT,
            )
        if m.state in CANCELLABLE:
            return tx.transition(migration_id, MigrationState.CANCELLED, message=f"cancelled by {by}")
        raise Conflict(f"migration {migration_id} is {m.state.value}: nothing to abort")


def timeline(store: Store, migration_id: str, *, dense: bool = True) -> list[dict[str, object]]:
    """The recorded progress of a migration, oldest first, for ``host-engine report`` (rounds, remaining
    bytes, rate, throttle and disk limit over time), attempt by attempt: every kept sample
    (``host_engine.samples``) merged with the logged changes, or with ``dense=False`` the logged changes
    only (one row per change of phase, round, throttle or disk limit). A sample's ``at`` is its attempt's
    start plus its ``elapsed_s``; migrations recorded before samples were kept have the changes only."""
    entries = store.migration_log(migration_id)
    changes: dict[int, list[dict[str, object]]] = {}
    started: dict[int, datetime] = {}
    attempt = 0
    for e in entries:
        if e.to_state in (MigrationState.RUNNING, MigrationState.OFFLINE_RUNNING):
            attempt += 1
            started[attempt] = e.at
        if e.kind == LogKind.PROGRESS:
            changes.setdefault(attempt, []).append({"at": e.at.isoformat(), "attempt": attempt, **e.data})
    samples = sample_rows(store.get_migration(migration_id).stats) if dense else {}
    rows: list[dict[str, object]] = []
    for n in sorted(changes.keys() | (samples.keys() & started.keys())):
        logged = changes.get(n, [])
        seen = {r.get("elapsed_s") for r in logged}
        start = started.get(n)
        extra = [
            {"at": (start + timedelta(seconds=_seconds(s))).isoformat(), "attempt": n, **s}
            for s in samples.get(n, [])
            if start is not None and s.get("elapsed_s") not in seen
        ]
        rows += sorted(logged + extra, key=_seconds)
    return rows


def _seconds(row: dict[str, object]) -> float:
    value = row.get("elapsed_s")
    return float(value) if isinstance(value, int | float) else 0.0
