"""Taking over attempts nobody supervises: their worker died, was restarted, or released them.

An orphan is a running migration that is unclaimed (released at a shutdown), this worker's own from before a
restart (its name is held by one live process), or another worker's whose lease expired by the store's clock
(never within one lease after a store outage: workers that could not renew meanwhile keep their attempts).
The hypervisor makes the droplet run on exactly one host (``HypervisorDriver.recover``: adopted when the
switchover happened, else aborted with the source untouched), and that is recorded as the attempt's end, with
the real figures the driver reports or, failing that, the progress the dead worker last recorded.
"""

from __future__ import annotations

import logging
from datetime import datetime

from host_engine.attempt import MigrationResult, Outcome
from host_engine.drivers.base import DriverError, Recovered
from host_engine.errors import HostEngineError
from host_engine.executor_attempts import PROGRESS_KEY, ActiveAttempt, AttemptsExecutor
from host_engine.models import Migration
from host_engine.outcome import ABORT_REQUEST_KEY, Finished
from host_engine.states import MigrationState

log = logging.getLogger(__name__)


class RecoveringExecutor(AttemptsExecutor):
    """``AttemptsExecutor`` that also recovers orphans (``recover``); ``host_engine.executor.Executor`` adds
    the loop and claiming."""

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
            a = ActiveAttempt(m, None, m.state is MigrationState.OFFLINE_RUNNING, self.clock.now())
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

    def _recover_main(self, a: ActiveAttempt) -> None:
        """Ask the hypervisor where the droplet runs (cancelling what is left of the job), and turn the
        answer into the attempt's result: the recorded progress supplies what the dead worker measured."""
        m = a.migration
        try:
            answer = self.hypervisor.recover(self._spec(m))
        except (HostEngineError, DriverError):
            log.exception("migration_id=%s: recovery failed; will try again", m.id)
            return
        where, reported = recovered(answer)
        log.warning(
            "migration_id=%s droplet_id=%s: attempt %s of %s recovered by %s; droplet runs on %s",
            m.id,
            m.droplet_id,
            m.attempt,
            m.claimed_by if a.extra.get("previous_worker") is None else a.extra["previous_worker"],
            self.config.worker,
            where,
        )
        a.result = recovered_result(m, where, reported, now=self.store.now())


def recovered(answer: str | Recovered) -> tuple[str, dict[str, object]]:
    """``HypervisorDriver.recover``'s answer: the host that runs the droplet, and what the hypervisor still
    knew of the attempt (``Recovered.stats``), when it says."""
    if isinstance(answer, Recovered):
        return answer.host, dict(answer.stats)
    return answer, {}


def recovered_result(
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
