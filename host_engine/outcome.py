"""How an attempt's end is recorded: the migration completes, or goes down the failure path.

``OutcomeRecorder.finish`` is the executor's last word on an attempt. A completed one moves the droplet and
completes the migration in one transaction; a failed one becomes ``failed`` and, in the same transaction,
``notified`` again for a retry (the retry policy, ``host_engine.retry``, says when, and whether to another
target: the failed one is avoided when it was at fault), ``offline_required`` when the retries are used up or
the guest twice did not converge, ``cancelled`` when an operator aborted it, or stays ``failed`` for an
operator when offline copies keep failing. The hooks (metadata servers) hear of it after the commit.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from host_engine.attempt import MigrationResult, Outcome
from host_engine.controller import NONCONVERGING
from host_engine.executor_config import ExecutorHooks, NoHooks, TargetChooser
from host_engine.executor_metrics import ExecutorMetrics
from host_engine.models import Migration
from host_engine.retry import RetryConfig, RetryCounters, after_failure, backoff_s
from host_engine.samples import SAMPLES_KEY, SampleBuffer, with_samples
from host_engine.states import LogKind, MigrationState
from host_engine.store import Store, Tx, offline_event_id

log = logging.getLogger(__name__)

# The abort reason of a worker's own shutdown: the migration goes back to the retry path, not cancelled.
SHUTDOWN_REASON = "worker shutting down"
# Keys in ``migrations.stats``: who asked for an abort (until the attempt ends), the last attempt's figures.
ABORT_REQUEST_KEY = "abort_requested_by"
LAST_ATTEMPT_KEY = "last_attempt"


@dataclass(frozen=True)
class Finished:
    """An attempt that ended, and the state its migration is in afterwards."""

    migration_id: str
    attempt: int
    result: MigrationResult
    state: MigrationState


class OutcomeRecorder:
    """Records attempts' ends for one worker (``worker``: every write proves its claim still holds)."""

    def __init__(
        self,
        store: Store,
        worker: str,
        *,
        retry: RetryConfig,
        max_offline_attempts: int,
        hooks: ExecutorHooks | None = None,
        choose_target: TargetChooser | None = None,
        rand: Callable[[], float] = random.random,
        metrics: ExecutorMetrics | None = None,
    ) -> None:
        self.store = store
        self.worker = worker
        self.retry = retry
        self.max_offline_attempts = max_offline_attempts
        self.hooks: ExecutorHooks = hooks or NoHooks()
        self.choose_target = choose_target
        self.rand = rand
        self.metrics = metrics

    def finish(
        self,
        m: Migration,
        offline: bool,
        result: MigrationResult,
        *,
        operator_abort: str | None,
        extra: dict[str, object] | None = None,
        samples: SampleBuffer | None = None,
    ) -> Finished:
        """Record how attempt ``m.attempt`` ended (``extra``: more for its record, e.g. who recovered it;
        ``samples``: its progress samples not written yet) and take the migration where that leads."""
        worker = self.worker
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
            config=self.retry,
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
        if counters.offline_attempts >= self.max_offline_attempts:
            tx.update_migration(
                m.id,
                claimed_by=None,
                claimed_at=None,
                message="offline copy failed too often: operator needed (retry or cancel)",
                log_kind=LogKind.ALERT,
            )
            return tx.get_migration(m.id), ""
        not_before = now + timedelta(seconds=backoff_s(m.attempt, self.retry, self.rand))
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


def _ms(downtime_ms: float | None) -> str:
    return "unknown" if downtime_ms is None else f"{downtime_ms:.0f} ms"
