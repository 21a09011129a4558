"""The executor: drives migrations through a hypervisor driver under the convergence controller.

``run_migration(driver, config, clock)`` runs one attempt to its end and returns a ``MigrationResult``;
``MigrationRun`` is the same loop one tick at a time, so one process can drive several migrations that share
NICs (``run_concurrently``). The clock is a parameter (``SimClock`` advances a simulated world; ``RealClock``
sleeps), so nothing here ever sleeps in a test.

Whatever happens, an attempt ends in one of two states the rest of the system can rely on:
``COMPLETED`` — the droplet runs on the target, the source holds nothing, no limit is left on it;
or ``ABORTED``/``FAILED`` — the source runs the droplet untouched (resumed, no throttle, no disk limit)
and the target holds nothing of it. Which host was at fault goes to the retry policy (``host_engine.retry``).

Around that loop, the store side:

- ``Executor`` claims due migrations (``FOR UPDATE SKIP LOCKED``), drives them, records progress and the log,
  and takes each failure down the path of DESIGN.md §3 (retry, another target, ``offline_required``, the
  offline copy); it also recovers migrations whose worker died. ``tick()`` is one engine-loop step.
- ``request_abort`` is ``host-engine abort``; ``timeline`` feeds ``host-engine report``; ``ExecutorMetrics``
  is the Prometheus side; ``SimTickStep`` runs it all on the simulated hypervisor inside ``host-engine run``.
"""

from __future__ import annotations

import enum
import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from host_engine.config import EngineConfig, PlacementConfig
from host_engine.controller import (
    Abort,
    AbortReason,
    Action,
    ControllerConfig,
    ControllerState,
    Decision,
    SetDiskWriteLimit,
    SetMemoryThrottle,
    Switchover,
    decide,
    eta_s,
)
from host_engine.drivers.base import (
    DomainState,
    DriverError,
    HypervisorDriver,
    MigrationDriver,
    MigrationSpec,
    Phase,
    Progress,
)
from host_engine.drivers.sim import (
    WORKLOADS,
    WORLD_KEY,
    SimClock,
    SimHypervisor,
    SimWorld,
    WorldConflict,
    load_world,
    save_world,
)
from host_engine.errors import Conflict, HostEngineError, InvalidInput, StaleClaim
from host_engine.models import Migration
from host_engine.planner import plan_placement
from host_engine.retry import RetryConfig, after_failure, backoff_s
from host_engine.states import CANCELLABLE, MigrationState
from host_engine.store import Store, Tx, offline_event_id

log = logging.getLogger(__name__)

# The controller looks every 0.5 s: QEMU refreshes its dirty rate once a second and libvirt's jobStats is
# cheap; a faster tick only reacts to noise, a slower one lets a 300 ms switchover window pass.
DEFAULT_TICK_S = 0.5


class Clock(Protocol):
    def now(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class RealClock:
    """Wall-clock time for real hypervisors."""

    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class Outcome(enum.Enum):
    COMPLETED = "completed"
    ABORTED = "aborted"  # the controller (or an operator) gave up: did not converge, timed out, stalled
    FAILED = "failed"  # the driver reported an error (a host crashed, the job failed)


@dataclass(frozen=True)
class MigrationResult:
    """How one attempt ended, with what operators judge it by."""

    outcome: Outcome
    reason: str | None
    abort_reason: AbortReason | None
    target_at_fault: bool
    duration_s: float
    downtime_ms: float | None
    throttle_pct_s: float  # percent x seconds of vCPU throttle
    disk_limit_s: float  # seconds under a disk write limit
    bytes_transferred: int
    rounds: int
    trace: tuple[Progress, ...] = field(default=(), repr=False)

    @property
    def converged(self) -> bool:
        return self.outcome is Outcome.COMPLETED

    def summary(self) -> dict[str, object]:
        """Plain values for the migration log and ``--json``."""
        return {
            "outcome": self.outcome.value,
            "reason": self.reason,
            "abort_reason": self.abort_reason.value if self.abort_reason else None,
            "target_at_fault": self.target_at_fault,
            "duration_s": round(self.duration_s, 3),
            "downtime_ms": None if self.downtime_ms is None else round(self.downtime_ms, 1),
            "throttle_pct_s": round(self.throttle_pct_s, 1),
            "disk_limit_s": round(self.disk_limit_s, 2),
            "bytes_transferred": self.bytes_transferred,
            "rounds": self.rounds,
        }


#: A replacement for the controller (benchmarks compare ours with other policies): Progress -> actions.
Policy = Callable[[Progress], tuple[Action, ...]]


class MigrationRun:
    """One attempt, advanced one controller tick at a time by ``step``."""

    def __init__(
        self,
        driver: MigrationDriver,
        config: ControllerConfig,
        clock: Clock,
        *,
        on_progress: Callable[[Progress], None] | None = None,
        should_abort: Callable[[], str | None] | None = None,
        keep_trace: bool = True,
        policy: Policy | None = None,
    ) -> None:
        self.driver = driver
        self.policy = policy
        self.config = config
        self.clock = clock
        self.on_progress = on_progress
        self.should_abort = should_abort
        self.keep_trace = keep_trace
        self.state = ControllerState()
        self.trace: list[Progress] = []
        self.result: MigrationResult | None = None
        self._started_at = clock.now()
        self._last_at = self._started_at
        self._last: Progress | None = None
        self._throttle_pct_s = 0.0
        self._disk_limit_s = 0.0

    def begin(self) -> bool:
        """Prepare the target and start copying. False (with ``result`` set) if that already failed."""
        try:
            self.driver.prepare_target()
            self.driver.set_max_downtime(self.config.max_downtime_ms)
            self.driver.start()
        except DriverError as e:
            log.warning("migration could not start: %s", e)
            self._end(Outcome.FAILED, str(e), None, e.target_at_fault)
            return False
        return True

    def step(self) -> MigrationResult | None:  # noqa: PLR0911 - one exit per way an attempt can end
        """One tick: read progress, apply the controller's actions. The result once the attempt is over."""
        if self.result is not None:
            return self.result
        try:
            p = self.driver.progress()
        except DriverError as e:
            return self._end(Outcome.FAILED, str(e), None, e.target_at_fault)
        self._integrate(p)
        if self.keep_trace:
            self.trace.append(p)
        if self.on_progress is not None:
            self.on_progress(p)

        if self.policy is not None:
            decision = Decision(self.policy(p), self.state)
        else:
            decision = decide(p, self.config, self.state)
        self.state = decision.state
        if p.phase is Phase.DONE:
            self._apply_lifts(decision.actions)
            return self._end(Outcome.COMPLETED, None, None, False, p)
        if p.phase is Phase.FAILED:
            return self._end(Outcome.FAILED, p.error or "driver reported failure", None, p.target_at_fault, p)

        operator = self.should_abort() if self.should_abort is not None else None
        if operator is not None:
            return self._end(Outcome.ABORTED, operator, None, False, p)
        try:
            for action in decision.actions:
                if isinstance(action, Abort):
                    log.info("controller aborts: %s", action.message)
                    return self._end(Outcome.ABORTED, action.message, action.reason, False, p)
                self._apply(action)
        except DriverError as e:
            return self._end(Outcome.FAILED, str(e), None, e.target_at_fault, p)
        return None

    def _apply(self, action: SetDiskWriteLimit | SetMemoryThrottle | Switchover) -> None:
        if isinstance(action, SetDiskWriteLimit):
            log.info("disk write limit -> %s B/s", action.bytes_per_s)
            self.driver.set_disk_write_limit(action.bytes_per_s)
        elif isinstance(action, SetMemoryThrottle):
            log.info("memory throttle -> %s %%", action.percent)
            self.driver.set_memory_throttle(action.percent)
        else:
            log.info("switchover")
            self.driver.switchover()

    def _apply_lifts(self, actions: Sequence[object]) -> None:
        for action in actions:
            if isinstance(action, SetDiskWriteLimit | SetMemoryThrottle):
                try:
                    self._apply(action)
                except DriverError as e:  # the source is gone after switchover: nothing left to lift
                    log.debug("lift after switchover: %s", e)

    def _integrate(self, p: Progress) -> None:
        now = self.clock.now()
        if self._last is not None:
            dt = now - self._last_at
            self._throttle_pct_s += self._last.memory_throttle_pct * dt
            if self._last.disk_write_limit_bps is not None:
                self._disk_limit_s += dt
        self._last, self._last_at = p, now

    def _end(
        self,
        outcome: Outcome,
        reason: str | None,
        abort_reason: AbortReason | None,
        target_at_fault: bool,
        p: Progress | None = None,
    ) -> MigrationResult:
        if outcome is Outcome.COMPLETED:
            try:
                self.driver.finalize(True)
            except DriverError as e:  # the droplet runs on the target; a leftover on the source is logged
                log.error("finalize after success failed (source copy may be left): %s", e)
        else:
            self._clean_up_failure()
        self.result = MigrationResult(
            outcome=outcome,
            reason=reason,
            abort_reason=abort_reason,
            target_at_fault=target_at_fault,
            duration_s=self.clock.now() - self._started_at,
            downtime_ms=p.downtime_ms if p is not None and outcome is Outcome.COMPLETED else None,
            throttle_pct_s=self._throttle_pct_s,
            disk_limit_s=self._disk_limit_s,
            bytes_transferred=p.bytes_transferred if p is not None else 0,
            rounds=p.round if p is not None else 0,
            trace=tuple(self.trace),
        )
        return self.result

    def _clean_up_failure(self) -> None:
        """Source untouched (resumed, unthrottled), target clean. Each step tried even if another fails."""
        for what, call in (
            ("abort", self.driver.abort),
            ("lift disk limit", lambda: self.driver.set_disk_write_limit(None)),
            ("lift throttle", lambda: self.driver.set_memory_throttle(0)),
            ("finalize(failure)", lambda: self.driver.finalize(False)),
        ):
            try:
                call()
            except DriverError as e:
                log.warning("%s during clean-up failed: %s", what, e)


def run_migration(
    driver: MigrationDriver,
    config: ControllerConfig,
    clock: Clock,
    *,
    tick_s: float = DEFAULT_TICK_S,
    on_progress: Callable[[Progress], None] | None = None,
    should_abort: Callable[[], str | None] | None = None,
    policy: Policy | None = None,
) -> MigrationResult:
    """Run one migration attempt to its end: prepare, start, tick the controller, finish or clean up.

    ``policy`` replaces the convergence controller (benchmarks of other policies); ``on_progress`` sees every
    snapshot; ``should_abort`` returning a reason stops the attempt (source untouched, target cleaned).
    """
    run = MigrationRun(
        driver, config, clock, on_progress=on_progress, should_abort=should_abort, policy=policy
    )
    if not run.begin() and run.result is not None:
        return run.result
    while True:
        result = run.step()
        if result is not None:
            return result
        clock.sleep(tick_s)


def run_concurrently(
    runs: Sequence[MigrationRun], clock: Clock, *, tick_s: float = DEFAULT_TICK_S
) -> list[MigrationResult]:
    """Drive several attempts in one loop (they share NICs in the sim); results in the order given."""
    results: dict[int, MigrationResult] = {}
    for i, run in enumerate(runs):
        if not run.begin() and run.result is not None:
            results[i] = run.result
    while len(results) < len(runs):
        for i, run in enumerate(runs):
            if i not in results:
                r = run.step()
                if r is not None:
                    results[i] = r
        if len(results) < len(runs):
            clock.sleep(tick_s)
    return [results[i] for i in range(len(runs))]


# --- The executor proper: migrations from the store, one worker among several ------------------------------

# Renew the claim every 30 s against a 300 s lease: ten missed renewals before another worker may take over,
# yet a dead worker's migration is recovered within five minutes.
DEFAULT_RENEW_EVERY_S = 30.0
DEFAULT_LEASE_S = 300.0
# Write progress (stats) to the store every 5 s, and a log line whenever phase, round, throttle or disk limit
# changes: `status --watch` refreshes about that fast, and the store sees well under one write per second.
DEFAULT_PROGRESS_EVERY_S = 5.0
# Four concurrent attempts per worker: they share NICs fairly, so more only stretches every one of them.
DEFAULT_MAX_CONCURRENT = 4
# An offline copy that failed this often needs an operator: the migration stays ``failed``.
DEFAULT_MAX_OFFLINE_ATTEMPTS = 3
# Keys in ``migrations.stats``.
ABORT_REQUEST_KEY = "abort_requested_by"
NONCONVERGING_KEY = "nonconverging_attempts"
OFFLINE_ATTEMPTS_KEY = "offline_attempts"
FAILED_TARGETS_KEY = "failed_targets"
PROGRESS_KEY = "progress"
LAST_ATTEMPT_KEY = "last_attempt"


@dataclass(frozen=True)
class ExecutorConfig:
    worker: str
    max_concurrent: int = DEFAULT_MAX_CONCURRENT
    tick_s: float = DEFAULT_TICK_S
    renew_every_s: float = DEFAULT_RENEW_EVERY_S
    lease_s: float = DEFAULT_LEASE_S
    progress_every_s: float = DEFAULT_PROGRESS_EVERY_S
    max_offline_attempts: int = DEFAULT_MAX_OFFLINE_ATTEMPTS
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    # Claim only these migrations (``host-engine migrate --now`` runs its own, not whatever else is due).
    only: frozenset[str] | None = None


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
    migration: Migration
    run: MigrationRun
    offline: bool
    last_write_s: float
    last_logged: Progress | None = None
    lost_claim: str | None = None
    abort_requested: str | None = None


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

    The engine's loop calls ``tick()`` and then sleeps ``config.tick_s`` on the same clock;
    ``run_until_idle()`` does both until nothing runs (``host-engine migrate --now``, tests). Several
    processes may run against one PostgreSQL: claims skip rows another worker holds (``FOR UPDATE SKIP
    LOCKED``) and every write after the claim proves it still holds (``worker=``). On SQLite, one writer.
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
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.hypervisor = hypervisor
        self.config = config
        self.clock = clock
        self.hooks: ExecutorHooks = hooks or NoHooks()
        self.choose_target = choose_target
        self.rand = rand or random.Random().random  # noqa: S311 - jitter, not secrets
        self.active: dict[str, _Active] = {}
        self._last_recover_s: float | None = None
        self._waiting_logged: set[str] = set()

    # ---- the loop ----------------------------------------------------------------------------------------

    def tick(self) -> list[Finished]:
        """Recover orphans (now and then), claim what is due, advance every attempt by one controller step."""
        done: list[Finished] = []
        now = self.clock.now()
        if self._last_recover_s is None or now - self._last_recover_s >= self.config.renew_every_s:
            self._last_recover_s = now
            done += self.recover()
        done += self.claim_due()
        for a in list(self.active.values()):
            finished = self._step(a)
            if finished is not None:
                done.append(finished)
        return done

    def run_until_idle(self, *, max_s: float | None = None) -> list[Finished]:
        """Tick and sleep on the clock until nothing is running (or ``max_s`` passes)."""
        started = self.clock.now()
        done = self.tick()
        while self.active and (max_s is None or self.clock.now() - started < max_s):
            self.clock.sleep(self.config.tick_s)
            done += self.tick()
        return done

    def shutdown(self) -> list[Finished]:
        """Stop this worker: abort its attempts (sources untouched) and hand them to the retry path."""
        done = []
        for a in list(self.active.values()):
            a.abort_requested = a.abort_requested or "worker shutting down"
            finished = self._step(a)
            if finished is not None:
                done.append(finished)
        return done

    # ---- starting ----------------------------------------------------------------------------------------

    def claim_due(self) -> list[Finished]:
        """Claim and start what is due, up to ``max_concurrent``. A migration that must wait (its guest has
        not shut down for an offline copy yet) is skipped unclaimed, so it never blocks the ones behind it."""
        free = self.config.max_concurrent - len(self.active)
        if free <= 0:
            return []
        now = self.store.clock()
        stale_before = now - timedelta(seconds=self.config.lease_s)
        done = []
        for m in self.store.list_migrations(
            states=(MigrationState.NOTIFIED, MigrationState.OFFLINE_REQUIRED)
        ):
            if free <= 0:
                break
            # Due at not_before; a guest that acknowledged "ready" may go earlier (DESIGN.md §3, step 5).
            due = m.not_before <= now or (m.state is MigrationState.NOTIFIED and m.ack == "ready")
            held = m.claimed_by is not None and m.claimed_at is not None and m.claimed_at >= stale_before
            if self.config.only is not None and m.id not in self.config.only:
                continue
            if m.id in self.active or not due or held or self._must_wait(m):
                continue
            claimed = self.store.claim(
                self.config.worker, states=(m.state,), lease_s=self.config.lease_s, migration_id=m.id
            )
            if not claimed:  # another worker was faster
                continue
            free -= 1
            try:
                finished = self._start(claimed[0])
            except (HostEngineError, DriverError):
                # Claimed (maybe already running) but not started here: recovery picks it up again.
                log.exception("migration_id=%s droplet_id=%s: could not start", m.id, m.droplet_id)
                continue
            if finished is not None:
                done.append(finished)
        return done

    @staticmethod
    def _wants_offline(m: Migration, power: DomainState) -> bool:
        return (
            m.offline
            or m.state is MigrationState.OFFLINE_REQUIRED
            or m.ack == "offline"
            or power is DomainState.SHUT_OFF
        )

    def _must_wait(self, m: Migration) -> bool:
        """Not startable yet: the droplet is absent (an operator must look), or an offline copy waits for the
        guest, which was told (offline_migrate, or it acknowledged offline), to shut itself down."""
        power = self.hypervisor.domain_state(m.source_host, m.droplet_id)
        if power is not DomainState.ABSENT and not (
            self._wants_offline(m, power) and power is not DomainState.SHUT_OFF
        ):
            self._waiting_logged.discard(m.id)
            return False
        if m.id not in self._waiting_logged:
            note = (
                f"{m.droplet_id} is not on {m.source_host}: operator needed"
                if power is DomainState.ABSENT
                else f"waiting for {m.droplet_id} to shut down for the offline copy"
            )
            self.store.append_log(m.id, "wait", note, droplet_id=m.droplet_id)
            log.warning("migration_id=%s: %s", m.id, note)
            self._waiting_logged.add(m.id)
        return True

    def _start(self, m: Migration) -> Finished | None:
        worker = self.config.worker
        offline = self._wants_offline(m, self.hypervisor.domain_state(m.source_host, m.droplet_id))
        attempt = m.attempt + 1
        m = self.store.transition(
            m.id,
            MigrationState.OFFLINE_RUNNING if offline else MigrationState.RUNNING,
            worker=worker,
            attempt=attempt,
            offline=offline,
            started_at=self.store.clock(),
            message=f"attempt {attempt} ({'offline copy' if offline else 'live'}) "
            f"{m.source_host} -> {m.target_host} on {worker}",
        )
        log.info("migration_id=%s droplet_id=%s attempt %s started", m.id, m.droplet_id, attempt)
        run = MigrationRun(self.hypervisor.migration(self._spec(m)), self.config.controller, self.clock)
        a = _Active(m, run, offline, self.clock.now())
        run.on_progress = lambda p: self._on_progress(a, p)
        run.should_abort = lambda: a.lost_claim or a.abort_requested
        self.active[m.id] = a
        if not run.begin():
            return self._step(a)
        return None

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
        )

    # ---- running -----------------------------------------------------------------------------------------

    def _on_progress(self, a: _Active, p: Progress) -> None:
        """Renew the claim, record progress, pick up an operator's abort: at most every few seconds."""
        now = self.clock.now()
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
                tx.update_migration(mid, stats={**m.stats, PROGRESS_KEY: progress_dict(p)})
                if changed:
                    tx.append_log(
                        mid, "progress", describe(p), droplet_id=m.droplet_id, data=progress_dict(p)
                    )
        except StaleClaim as e:
            log.error("migration_id=%s: %s; stopping this attempt", mid, e)
            a.lost_claim = f"claim lost: {e}"
            return
        except HostEngineError as e:  # the store is unreachable: keep migrating, write on a later tick
            log.warning("migration_id=%s: progress not recorded: %s", mid, e)
            return
        requested = m.stats.get(ABORT_REQUEST_KEY)
        if requested and not a.abort_requested:
            a.abort_requested = f"aborted by {requested}"
        a.last_write_s = now
        a.last_logged = p

    def _step(self, a: _Active) -> Finished | None:
        result = a.run.result or a.run.step()
        if result is None:
            return None
        del self.active[a.migration.id]
        if a.lost_claim:
            # Another worker took over (our lease expired): it owns the store row and recovery.
            return Finished(a.migration.id, a.migration.attempt, result, a.migration.state)
        try:
            return self._finish(a.migration, a.offline, result, operator_abort=a.abort_requested)
        except HostEngineError:
            # The hypervisors are consistent (one host runs the droplet); the store could not record it. The
            # row stays running under our claim and recovery finishes it from what the hypervisor reports.
            log.exception("migration_id=%s: outcome not recorded; recovery will", a.migration.id)
            return Finished(a.migration.id, a.migration.attempt, result, a.migration.state)

    # ---- ending ------------------------------------------------------------------------------------------

    def _finish(
        self, m: Migration, offline: bool, result: MigrationResult, *, operator_abort: str | None
    ) -> Finished:
        worker = self.config.worker
        if self.metrics is not None:
            self.metrics.observe(result)
        attempt_stats = {"attempt": m.attempt, "offline": offline, **result.summary()}
        if result.outcome is Outcome.COMPLETED:
            done = self.store.complete(
                m.id,
                worker=worker,
                stats={LAST_ATTEMPT_KEY: attempt_stats},
                message=f"completed: {m.droplet_id} now on {m.target_host} "
                f"(downtime {result.downtime_ms or 0:.0f} ms, {result.duration_s:.1f} s)",
            )
            log.info("migration_id=%s droplet_id=%s completed on %s", m.id, m.droplet_id, m.target_host)
            self._hook("completed", done)
            return Finished(m.id, m.attempt, result, done.state)

        now = self.store.clock()
        nonconverging = int(m.stats.get(NONCONVERGING_KEY, 0))
        if result.abort_reason in (AbortReason.STALLED, AbortReason.TIMEOUT):
            nonconverging += 1
        failed_targets = set(m.stats.get(FAILED_TARGETS_KEY, []))
        if result.target_at_fault:
            failed_targets.add(m.target_host)
        offline_attempts = int(m.stats.get(OFFLINE_ATTEMPTS_KEY, 0)) + (1 if offline else 0)
        stats = {
            **m.stats,
            LAST_ATTEMPT_KEY: attempt_stats,
            NONCONVERGING_KEY: nonconverging,
            FAILED_TARGETS_KEY: sorted(failed_targets),
            OFFLINE_ATTEMPTS_KEY: offline_attempts,
        }
        stats.pop(ABORT_REQUEST_KEY, None)
        reason = result.reason or result.outcome.value
        log.warning(
            "migration_id=%s droplet_id=%s attempt %s failed: %s", m.id, m.droplet_id, m.attempt, reason
        )
        cancel = bool(operator_abort) and operator_abort != "worker shutting down"
        # Decided before the transaction: choosing a target reads the store (placement) on its own.
        target = m.target_host
        if result.target_at_fault and self.choose_target is not None and not cancel:
            target = self.choose_target(m, frozenset(failed_targets | {m.source_host})) or target
        with self.store.begin() as tx:
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
                nxt, hook = self._after_offline_failure(tx, failed, now, target)
            else:
                nxt, hook = self._after_live_failure(tx, failed, now, result, nonconverging, target)
        if hook:
            self._hook(hook, nxt)
        return Finished(m.id, m.attempt, result, nxt.state)

    def _after_live_failure(
        self,
        tx: Tx,
        m: Migration,
        now: datetime,
        result: MigrationResult,
        nonconverging: int,
        other_target: str,
    ) -> tuple[Migration, str]:
        decision = after_failure(
            attempt=m.attempt,
            max_attempts=m.max_attempts,
            target_at_fault=result.target_at_fault,
            abort_reason=result.abort_reason.value if result.abort_reason else None,
            nonconverging_attempts=nonconverging,
            config=self.config.retry,
            rand=self.rand,
        )
        not_before = now + timedelta(seconds=decision.delay_s)
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
        self, tx: Tx, m: Migration, now: datetime, target: str
    ) -> tuple[Migration, str]:
        if int(m.stats.get(OFFLINE_ATTEMPTS_KEY, 0)) >= self.config.max_offline_attempts:
            tx.update_migration(
                m.id,
                claimed_by=None,
                claimed_at=None,
                message="offline copy failed too often: operator needed (retry or cancel)",
                log_kind="alert",
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
        """Take over running migrations whose worker died (claim lease expired, or this worker's own after a
        restart): make the droplet run on exactly one host, then record the outcome as the attempt's end."""
        now = self.store.clock()
        stale_before = now - timedelta(seconds=self.config.lease_s)
        worker = self.config.worker
        done = []
        candidates = self.store.list_migrations(
            states=(MigrationState.RUNNING, MigrationState.OFFLINE_RUNNING)
        )
        for candidate in candidates:
            if candidate.id in self.active:
                continue
            ours = candidate.claimed_by == worker
            stale = (
                candidate.claimed_by is None
                or candidate.claimed_at is None
                or candidate.claimed_at < stale_before
            )
            if not (ours or stale):
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
            try:
                where = self.hypervisor.recover(self._spec(m))
            except (HostEngineError, DriverError):
                log.exception("migration_id=%s: recovery failed; will try again", m.id)
                continue
            log.warning(
                "migration_id=%s droplet_id=%s: worker %s died mid-attempt; droplet runs on %s",
                m.id,
                m.droplet_id,
                candidate.claimed_by,
                where,
            )
            completed = where == m.target_host
            result = MigrationResult(
                outcome=Outcome.COMPLETED if completed else Outcome.FAILED,
                reason=None if completed else "worker died mid-attempt; source resumed, target cleaned",
                abort_reason=None,
                target_at_fault=False,
                duration_s=0.0,
                downtime_ms=None,
                throttle_pct_s=0.0,
                disk_limit_s=0.0,
                bytes_transferred=0,
                rounds=0,
            )
            try:
                offline = m.state is MigrationState.OFFLINE_RUNNING
                requested = m.stats.get(ABORT_REQUEST_KEY)
                # An operator's abort of an orphaned attempt still cancels it (not a retry).
                operator_abort = f"aborted by {requested}" if requested else None
                done.append(self._finish(m, offline, result, operator_abort=operator_abort))
            except HostEngineError:
                log.exception("migration_id=%s: recovered outcome not recorded; will try again", m.id)
        return done


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
                log_kind="abort",
            )
        if m.state in CANCELLABLE:
            return tx.transition(migration_id, MigrationState.CANCELLED, message=f"cancelled by {by}")
        raise Conflict(f"migration {migration_id} is {m.state.value}: nothing to abort")


class _StatesCollector(Collector):
    """Migrations by state, read from the store at scrape time (every worker reports the same numbers)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("host_engine_migrations", "Migrations by state", labels=["state"])
        counts = dict.fromkeys(MigrationState, 0)
        for m in self._store.list_migrations():
            counts[m.state] += 1
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


def timeline(store: Store, migration_id: str) -> list[dict[str, object]]:
    """The recorded progress of a migration, oldest first, for ``host-engine report`` (rounds, remaining
    bytes, rate, throttle and disk limit over time; one row per logged change, attempt by attempt)."""
    rows: list[dict[str, object]] = []
    attempt = 0
    for e in store.migration_log(migration_id):
        if e.to_state in (MigrationState.RUNNING, MigrationState.OFFLINE_RUNNING):
            attempt += 1
        if e.kind == "progress":
            rows.append({"at": e.at.isoformat(), "attempt": attempt, **e.data})
    return rows


# --- The simulated hypervisor inside ``host-engine run`` ----------------------------------------------------

# The sim for a fleet read from the store: 16 MiB blocks keep an 80 GiB droplet at 5,120 versions.
SIM_DEFAULT_WORKLOAD = "web"


def sim_world_from_store(store: Store, *, seed: int = 0, workload: str = SIM_DEFAULT_WORKLOAD) -> SimWorld:
    """A simulated datacenter matching the store's inventory: every host, every droplet on its host, each
    droplet running the ``workload`` model (``shut_off`` droplets powered off)."""
    world = SimWorld(seed)
    for h in store.list_hosts():
        world.add_host(h.name)
    factory = WORKLOADS[workload]
    for d in store.list_droplets():
        world.add_droplet(
            d.id,
            d.host,
            memory_bytes=d.memory_bytes,
            disk_bytes=d.disk_bytes,
            vcpus=d.vcpus,
            workload=factory(),
            state=DomainState.SHUT_OFF
            if d.power_state == DomainState.SHUT_OFF.value
            else DomainState.RUNNING,
        )
    return world


class SimTickStep:
    """The executor on the simulated hypervisor, as a step of the engine loop (``Engine(steps=[...])``).

    Each ``tick`` advances the world by the wall time since the last one (times ``speed``), in controller
    ticks, then saves it to the store, where restarts, other processes and ``host-engine`` commands find it
    (DESIGN.md §9). Build it with ``open``, which loads the world (or creates one from the inventory).
    """

    def __init__(
        self,
        store: Store,
        world: SimWorld,
        executor: Executor,
        *,
        speed: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
        key: str = WORLD_KEY,
    ) -> None:
        self.store = store
        self.world = world
        self.executor = executor
        self.speed = speed
        self.monotonic = monotonic
        self.key = key
        self._last = monotonic()

    @classmethod
    def open(
        cls,
        store: Store,
        config: ExecutorConfig,
        *,
        speed: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
        hooks: ExecutorHooks | None = None,
        choose_target: TargetChooser | None = None,
        metrics: ExecutorMetrics | None = None,
        key: str = WORLD_KEY,
        seed: int = 0,
    ) -> SimTickStep:
        world = load_world(store, key)
        if world is None:
            world = sim_world_from_store(store, seed=seed)
            save_world(store, world, key)
            log.info(
                "created the simulated datacenter %r from the inventory (%s droplets)",
                key,
                len(world.droplets),
            )
        clock = SimClock(world)
        executor = Executor(
            store,
            SimHypervisor(world),
            config,
            clock,
            hooks=hooks,
            choose_target=choose_target,
            metrics=metrics,
        )
        return cls(store, world, executor, speed=speed, monotonic=monotonic, key=key)

    def tick(self) -> list[Finished]:
        now = self.monotonic()
        due_s = (now - self._last) * self.speed
        self._last = now
        done = self.executor.tick()
        tick_s = self.executor.config.tick_s
        while due_s > 1e-9:
            step = min(tick_s, due_s)
            self.world.advance(step)
            due_s -= step
            done += self.executor.tick()
        try:
            save_world(self.store, self.world, self.key)
        except WorldConflict:
            # Another process runs this world too: ours would overwrite its work. Stop driving it here.
            log.error("simulated datacenter %r changed under this process; stopping its executor", self.key)
            raise
        return done

    def shutdown(self) -> list[Finished]:
        """Stop driving: abort this worker's attempts (sources untouched, each handed to the retry path) and
        save the world, so nothing waits for the claim lease to expire."""
        done = self.executor.shutdown()
        save_world(self.store, self.world, self.key)
        return done


def executor_step(
    store: Store,
    config: EngineConfig,
    *,
    driver: str,
    hooks: ExecutorHooks | None = None,
    metrics: ExecutorMetrics | None = None,
    sim_speed: float = 1.0,
    only: Sequence[str] | None = None,
    monotonic: Callable[[], float] = time.monotonic,
) -> SimTickStep | Executor:
    """What ``host-engine run`` adds to the engine loop (``Engine(..., steps=[executor_step(...)])``).

    ``driver`` is ``"sim"`` (the simulated datacenter kept in the store, following wall time x ``sim_speed``)
    or ``"libvirt"`` (each host's ``hypervisor_uri``; ``config.libvirt``'s bandwidth cap, TLS and peer URIs).
    Both run under ``config.controller`` (the downtime budget). Either way retries pick another target
    through the placement filters and weighers, and the controller ticks once per engine poll. ``only``
    restricts the executor to those migration ids; ``monotonic`` is the wall clock the sim follows (tests
    inject one).
    """
    exec_config = ExecutorConfig(
        worker=config.worker_id,
        tick_s=config.engine.poll_interval_s,
        controller=config.controller,  # [controller]: the downtime budget, for either driver
        only=None if only is None else frozenset(only),
    )
    chooser = placement_chooser(store, config.placement)
    if driver == "sim":
        return SimTickStep.open(
            store,
            exec_config,
            speed=sim_speed,
            monotonic=monotonic,
            hooks=hooks,
            choose_target=chooser,
            metrics=metrics,
        )
    if driver == "libvirt":
        from host_engine.drivers.libvirt import LibvirtHypervisor

        uris = {h.name: h.hypervisor_uri for h in store.list_hosts()}
        lv = config.libvirt
        for name in sorted(set(lv.peer_uris) - set(uris)):
            log.warning("[libvirt] peer_uris.%s: no such host in the store; ignored", name)
        return Executor(
            store,
            LibvirtHypervisor(uris, peer_uris=lv.peer_uris, options=lv.options()),
            exec_config,
            RealClock(),
            hooks=hooks,
            choose_target=chooser,
            metrics=metrics,
        )
    raise InvalidInput(f"unknown hypervisor driver {driver!r} (sim, libvirt)", field="driver")
