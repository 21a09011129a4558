"""The executor: migrations from the store, driven one attempt at a time (``host_engine.attempt``).

- ``Executor`` claims due migrations (``FOR UPDATE SKIP LOCKED``), drives them, records progress and the log,
  and takes each failure down the path of DESIGN.md §3 (retry, another target, ``offline_required``, the
  offline copy); it also recovers migrations whose worker died. ``tick()`` is one engine-loop step.
- ``request_abort`` is ``host-engine abort``; ``timeline`` feeds ``host-engine report``.
- The Prometheus side is ``host_engine.executor_metrics``; the engine-loop steps that build an executor for
  ``host-engine run`` (sim or libvirt) are in ``host_engine.engine_steps``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

from host_engine.attempt import DEFAULT_TICK_S, Clock, MigrationResult, MigrationRun, Outcome
from host_engine.config import PlacementConfig
from host_engine.controller import (
    AbortReason,
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
)
from host_engine.errors import Conflict, HostEngineError, StaleClaim
from host_engine.executor_metrics import ExecutorMetrics
from host_engine.models import Migration
from host_engine.planner import plan_placement
from host_engine.retry import RetryConfig, after_failure, backoff_s
from host_engine.states import CANCELLABLE, MigrationState
from host_engine.store import Store, Tx, offline_event_id

log = logging.getLogger(__name__)


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
