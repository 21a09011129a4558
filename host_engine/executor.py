"""The executor: migrations from the store, driven one attempt at a time (``host_engine.attempt``).

- ``Executor`` claims due migrations and drives them, records progress and the log, and takes each failure
  down the failure path (retry, another target, ``offline_required``, the offline copy); it also
  recovers migrations whose worker died. ``tick()`` is one engine-loop step.
- ``request_abort`` is ``host-engine abort``.

One concern per module: ``executor_config`` (settings, hooks, choosing another target), ``executor_attempts``
(driving one attempt and recording its progress), ``outcome`` (recording its end: retry, another target,
offline, cancelled), ``executor_recovery`` (taking over orphans), this module (the loop, the store's work and
its outages, claiming and starting); ``executor_metrics`` is the Prometheus side, ``samples`` the progress
samples, ``engine_steps`` builds an executor for ``host-engine run`` (sim or libvirt).

Many workers, one store (docs/host-engine.md "Running several workers"):

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
from collections.abc import Callable

from host_engine.attempt import MigrationRun
from host_engine.drivers.base import DomainState, DriverError
from host_engine.errors import Conflict, HostEngineError, StaleClaim, StoreError
from host_engine.executor_attempts import (
    PROGRESS_KEY,
    STORE_RETRY_MAX_S,
    STORE_RETRY_MIN_S,
    ActiveAttempt,
    SpecParts,
    attempt_id,
)
from host_engine.executor_config import (
    DEFAULT_MAX_OFFLINE_ATTEMPTS,
    DEFAULT_PROGRESS_EVERY_S,
    DEFAULT_SHUTDOWN_GRACE_S,
    ExecutorConfig,
    ExecutorHooks,
    NoHooks,
    TargetChooser,
    placement_chooser,
)
from host_engine.executor_recovery import RecoveringExecutor
from host_engine.models import Migration
from host_engine.outcome import ABORT_REQUEST_KEY, LAST_ATTEMPT_KEY, SHUTDOWN_REASON, Finished
from host_engine.samples import SampleBuffer
from host_engine.states import CANCELLABLE, Ack, LogKind, MigrationState
from host_engine.store import Store
from host_engine.timeline import timeline

# The executor's API, wherever each part lives (callers import it from here).
__all__ = [
    "ABORT_REQUEST_KEY",
    "CANDIDATES_PER_SLOT",
    "DEFAULT_MAX_OFFLINE_ATTEMPTS",
    "DEFAULT_PROGRESS_EVERY_S",
    "DEFAULT_SHUTDOWN_GRACE_S",
    "LAST_ATTEMPT_KEY",
    "PROGRESS_KEY",
    "SHUTDOWN_REASON",
    "WAIT_RECHECK_S",
    "Executor",
    "ExecutorConfig",
    "ExecutorHooks",
    "Finished",
    "NoHooks",
    "TargetChooser",
    "attempt_id",
    "placement_chooser",
    "request_abort",
    "timeline",
]

log = logging.getLogger(__name__)

# A migration waiting for its guest to shut down (offline copy) or for an operator is looked at again this
# often, not every tick: each look is a hypervisor call.
WAIT_RECHECK_S = 10.0
# Due migrations read per claim pass, per free slot (the rest wait for the next tick).
CANDIDATES_PER_SLOT = 2


class Executor(RecoveringExecutor):
    """Claims due migrations from the store and drives them through a hypervisor driver under the controller.

    The engine's loop calls ``tick()`` and then sleeps ``config.tick_s``; ``run_until_idle()`` does both
    until nothing runs (``host-engine migrate --now``, tests). Several processes may run against one
    PostgreSQL (see the module docstring): every write after the claim proves the claim still holds
    (``worker=``). On SQLite, one writer at a time.
    """

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
            # Read before the claim: a store lost between claiming and launching would leave a claimed,
            # running row this process does not supervise, which its own recovery then throws away as an
            # orphan once the store is back (seen in the store-outage test).
            parts = self._spec_parts(m)
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
            self._launch(started, offline, parts)

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

    def _launch(self, m: Migration, offline: bool, parts: SpecParts | None = None) -> None:
        run = MigrationRun(
            self.hypervisor.migration(self._spec(m, parts)), self.config.controller, self.clock
        )
        a = ActiveAttempt(m, run, offline, self.clock.now(), samples=SampleBuffer(m.attempt))
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
