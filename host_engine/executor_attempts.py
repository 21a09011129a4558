"""The executor's attempts: each one driven (on its own thread, or stepped inline), its progress recorded,
its end handed to the outcome recorder (``host_engine.outcome``).

``AttemptsExecutor`` holds one worker's state (what it drives, its claims' bookkeeping) and everything about
a single attempt once it runs; ``host_engine.executor_recovery`` adds taking over attempts nobody
supervises, ``host_engine.executor.Executor`` the loop, the store work and claiming. With a real clock each
attempt runs on a thread of its own (a hypervisor call that blocks stalls only its migration); with the
simulated clock the caller steps every attempt inline.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from host_engine import requests as operator_requests
from host_engine.attempt import Clock, MigrationResult, MigrationRun, RealClock
from host_engine.drivers.base import HypervisorDriver, MigrationSpec, Phase, Progress
from host_engine.errors import HostEngineError, StaleClaim, StoreError
from host_engine.executor_config import ExecutorConfig, ExecutorHooks, TargetChooser
from host_engine.executor_metrics import ExecutorMetrics
from host_engine.models import Droplet, Host, Migration
from host_engine.outcome import ABORT_REQUEST_KEY, Finished, OutcomeRecorder
from host_engine.progress import describe, progress_dict
from host_engine.samples import SAMPLES_KEY, SampleBuffer, with_samples
from host_engine.states import LogKind
from host_engine.store import Store

log = logging.getLogger(__name__)

#: A migration's droplet, source host and target host, as a spec needs them.
SpecParts = tuple[Droplet, Host, Host]

# Store retries after a failure: 1 s, doubling, at most this (and never longer than a renewal period).
STORE_RETRY_MIN_S = 1.0
STORE_RETRY_MAX_S = 30.0
# The latest progress of a running attempt, in ``migrations.stats``.
PROGRESS_KEY = "progress"


@dataclass
class ActiveAttempt:
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


class AttemptsExecutor:
    """One worker's attempts (see the module docstring); ``host_engine.executor.Executor`` is the one to use.

    Several processes may run against one PostgreSQL: every write after the claim proves the claim still
    holds (``worker=``). On SQLite, one writer at a time.
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
        self.hypervisor = hypervisor
        self.config = config
        self.clock = clock
        self.rand = rand or random.Random().random  # noqa: S311 - jitter, not secrets
        self.outcomes = OutcomeRecorder(
            store,
            config.worker,
            retry=config.retry,
            max_offline_attempts=config.max_offline_attempts,
            hooks=hooks,
            choose_target=choose_target,
            rand=self.rand,
            metrics=metrics,
        )
        self.threaded = config.threads if config.threads is not None else isinstance(clock, RealClock)
        # Wall time for store retries and the post-outage hold-off (the sim clock may stand still).
        self.monotonic = monotonic
        self.active: dict[str, ActiveAttempt] = {}
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

    @property
    def metrics(self) -> ExecutorMetrics | None:
        """Where finished attempts are counted (``host_engine.executor_metrics``); None: nowhere."""
        return self.outcomes.metrics

    @metrics.setter
    def metrics(self, metrics: ExecutorMetrics | None) -> None:
        self.outcomes.metrics = metrics

    def _snapshot(self) -> list[ActiveAttempt]:
        with self._lock:
            return list(self.active.values())

    def _drain_done(self) -> list[Finished]:
        with self._lock:
            done, self._done = self._done, []
        return done

    def _finished(self, f: Finished) -> None:
        with self._lock:
            self._done.append(f)

    def _spawn(self, a: ActiveAttempt, target: Callable[[ActiveAttempt], None], name: str) -> None:
        a.thread = threading.Thread(target=self._thread_main, args=(a, target), name=name, daemon=True)
        a.thread.start()

    def _spec_parts(self, m: Migration) -> SpecParts:
        """What a hypervisor spec needs from the store besides the migration row (one read)."""
        with self.store.begin(readonly=True) as tx:
            return tx.get_droplet(m.droplet_id), tx.get_host(m.source_host), tx.get_host(m.target_host)

    def _spec(self, m: Migration, parts: SpecParts | None = None) -> MigrationSpec:
        """The hypervisor's spec of ``m``'s attempt; ``parts``: read before the claim (see ``_claim_due``),
        used when they are still ``m``'s droplet and hosts."""
        if parts is None or (parts[0].id, parts[1].name, parts[2].name) != (
            m.droplet_id,
            m.source_host,
            m.target_host,
        ):
            parts = self._spec_parts(m)
        droplet, source, target = parts
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

    def _thread_main(self, a: ActiveAttempt, target: Callable[[ActiveAttempt], None]) -> None:
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

    def _attempt_main(self, a: ActiveAttempt) -> None:
        run = a.run
        if run is None:
            return
        if run.begin():
            while run.step() is None:
                run.pause(self.config.tick_s)  # the job's end wakes it
        a.result = run.result

    def _advance_inline(self, a: ActiveAttempt) -> None:
        if a.run is None:
            return
        a.result = a.run.result or a.run.step()
        if a.result is not None:
            self._record(a)

    def _on_progress(self, a: ActiveAttempt, p: Progress) -> None:
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
    def _pick_up_force(a: ActiveAttempt, m: Migration) -> None:
        """An operator's force-complete of this attempt: the run switches over now (``force_switchover``);
        who and why go into the attempt's record."""
        forced = operator_requests.forced_now(m)
        if forced is None or a.run is None or a.run.forced is not None or a.offline:
            return
        a.run.force_switchover(forced.describe())
        a.extra.update(forced_by=forced.by, force_reason=forced.reason)
        log.warning("migration_id=%s: %s; switching over now", m.id, forced.describe())

    # ---- ending ------------------------------------------------------------------------------------------

    def _record(self, a: ActiveAttempt) -> bool:
        """Record an ended attempt in the store. True when done with it (recorded, or not ours to record);
        False when the store could not be reached (the caller tries again later)."""
        result = a.result
        if result is None:
            return False
        mid = a.migration.id
        final = result.trace[-1] if result.trace else None
        if a.samples is not None and final is not None and final.phase is Phase.DONE and result.converged:
            # A job found completed while being aborted: its last snapshot passed no tick (read at the
            # same instant as a sample already kept, it replaces it).
            a.samples.add(progress_dict(final))
        if a.lost_claim:
            # Another worker took over (our lease expired): it owns the store row and recovery.
            self._drop(a, Finished(mid, a.migration.attempt, result, a.migration.state))
            return True
        try:
            finished = self.outcomes.finish(
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

    def _drop(self, a: ActiveAttempt, finished: Finished) -> None:
        with self._lock:
            self.active.pop(a.migration.id, None)
            self._done.append(finished)
        self._ended.set()

    def _record_until_stored(self, a: ActiveAttempt) -> None:
        """On an attempt's thread: record its end, retrying with backoff while the store is unreachable
        (until shutdown's grace runs out: then the claim is released for the next worker to recover)."""
        wait_s = STORE_RETRY_MIN_S
        while not self._record(a):
            if self._stopping.wait(wait_s * (0.5 + self.rand())) and self._stopping.is_set():
                # Shutting down: one last try, then leave it to recovery.
                self._record(a)
                return
            wait_s = min(STORE_RETRY_MAX_S, wait_s * 2)
