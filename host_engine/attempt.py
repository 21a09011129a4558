"""One migration attempt: a hypervisor driver under the convergence controller, to its end.

``run_migration(driver, config, clock)`` runs one attempt and returns a ``MigrationResult``;
``MigrationRun`` is the same loop one tick at a time, so one process can drive several migrations that
share NICs (``run_concurrently``). The clock is a parameter (``SimClock`` advances a simulated world;
``RealClock`` sleeps), so nothing here ever sleeps in a test.

Whatever happens, an attempt ends in one of two states the rest of the system can rely on:
``COMPLETED`` — the droplet runs on the target, the source holds nothing, no limit is left on it;
or ``ABORTED``/``FAILED`` — the source runs the droplet untouched (resumed, no throttle, no disk limit)
and the target holds nothing of it. Which host was at fault goes to the retry policy (``host_engine.retry``).

Which of the two it is comes from the hypervisor, never from a timer: when the controller (or an operator)
gives up, the attempt asks the driver to abort, and a driver that finds the job completed meanwhile
(``AlreadyCompleted``, or a final snapshot in phase ``DONE``) makes the attempt ``COMPLETED``, with the
job's own downtime and bytes.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from host_engine.controller import (
    Abort,
    AbortReason,
    Action,
    ControllerConfig,
    ControllerState,
    Decision,
    SetDiskWriteLimit,
    SetMaxDowntime,
    SetMemoryThrottle,
    Switchover,
    decide,
    initial_downtime_ms,
)
from host_engine.drivers.base import (
    AlreadyCompleted,
    DriverError,
    ExplainsAbort,
    MigrationDriver,
    Phase,
    Progress,
)

log = logging.getLogger(__name__)


# A forced attempt (``MigrationRun.force_switchover``) still ends on these: the attempt ran out of time, or
# nothing moves at all; the controller's other reasons are about the downtime budget the operator waived.
FORCED_STILL_ABORT = frozenset({AbortReason.TIMEOUT, AbortReason.NO_TRANSFER})

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


@runtime_checkable
class WaitsForEnd(Protocol):
    """A driver whose job runs on its own (libvirt's ``migrateToURI3`` thread) and can say when it ended."""

    def wait_ended(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the job to end; True once it has."""
        ...


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
        # The operator's reason once ``force_switchover`` was called.
        self.forced: str | None = None
        self._job_ended = False

    def begin(self) -> bool:
        """Prepare the target and start copying. False (with ``result`` set) if that already failed."""
        try:
            self.driver.prepare_target()
            # The controller starts QEMU at a small limit and raises it (controller.next_downtime); a
            # replacement policy gets the whole budget from the start, as QEMU would.
            first = initial_downtime_ms(self.config) if self.policy is None else self.config.max_downtime_ms
            self.driver.set_max_downtime(first)
            self.driver.start()
        except DriverError as e:
            log.warning("migration could not start: %s", e)
            self._end(Outcome.FAILED, str(e), None, e.target_at_fault)
            return False
        return True

    def pause(self, tick_s: float) -> None:
        """Wait for the next tick: ``tick_s``, or less when the driver's job ends first (a driver with
        ``wait_ended``, on the real clock), so the end is read and recorded at once, not a tick later. After
        that, ticks are regular again: a job that has ended never makes the controller spin."""
        driver, real = self.driver, isinstance(self.clock, RealClock)
        if self._job_ended or not real or not isinstance(driver, WaitsForEnd):
            self.clock.sleep(tick_s)
            return
        self._job_ended = driver.wait_ended(tick_s)

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
        if self.forced is not None:
            return self._step_forced(p, decision)
        return self._step_controlled(p, decision)

    def _step_controlled(self, p: Progress, decision: Decision) -> MigrationResult | None:
        try:
            for action in decision.actions:
                if isinstance(action, Abort):
                    log.info("controller aborts: %s", action.message)
                    return self._end(Outcome.ABORTED, action.message, action.reason, False, p)
                self._apply(action)
        except DriverError as e:
            return self._end(Outcome.FAILED, str(e), None, e.target_at_fault, p)
        return None

    def force_switchover(self, reason: str) -> None:
        """An operator's force-complete: switch over as soon as the hypervisor can, whatever the budget.

        In the memory phase the source is paused at the next tick (the pause lasts as long as the remainder
        takes). In the disk phase nothing can be paused yet — libvirt pauses a guest whose mirror is not in
        sync only for a full copy of the rest — so the strongest disk write limit the controller allows
        (``disk_limit_floor_bps``) makes the mirror finish, and the switchover comes the moment memory
        copying starts. From then on the controller's own reasons to give up (stalled, not converging,
        switchover taking long) no longer apply; the completion timeout and a link that moves nothing still
        abort the attempt (source untouched)."""
        if self.forced is None:
            log.info("force-complete: %s", reason)
        self.forced = reason

    def _step_forced(self, p: Progress, decision: Decision) -> MigrationResult | None:
        for action in decision.actions:
            if isinstance(action, Abort) and action.reason in FORCED_STILL_ABORT:
                log.info("controller aborts a forced attempt: %s", action.message)
                return self._end(Outcome.ABORTED, action.message, action.reason, False, p)
        try:
            if p.phase is Phase.MEMORY:
                # Sent every tick until the driver reports the switchover (libvirt says "not yet" while
                # its view of the job still reads disk).
                self._apply(Switchover())
            elif p.phase in (Phase.PREPARING, Phase.DISK) and self.config.disk_limit_enabled:
                strongest = self.config.disk_limit_floor_bps
                if p.disk_write_limit_bps is None or p.disk_write_limit_bps > strongest:
                    self._apply(SetDiskWriteLimit(strongest))
        except DriverError as e:
            return self._end(Outcome.FAILED, str(e), None, e.target_at_fault, p)
        return None

    def _apply(self, action: SetDiskWriteLimit | SetMemoryThrottle | SetMaxDowntime | Switchover) -> None:
        if isinstance(action, SetMaxDowntime):
            log.info("downtime limit -> %s ms", action.ms)
            self.driver.set_max_downtime(action.ms)
        elif isinstance(action, SetDiskWriteLimit):
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
        if outcome is not Outcome.COMPLETED:
            if outcome is Outcome.ABORTED and isinstance(self.driver, ExplainsAbort):
                who = "the controller" if abort_reason is not None else "the engine"
                why = f"{abort_reason.value}: {reason}" if abort_reason is not None else reason
                self.driver.note_abort_reason(f"aborted by {who}: {why}")
            completed, target_unclean = self._clean_up_failure()
            if completed:
                log.warning(
                    "attempt wanted to end %s (%s), but the migration completed: recorded as completed",
                    outcome.value,
                    reason,
                )
                outcome, reason, abort_reason, target_at_fault = Outcome.COMPLETED, None, None, False
                p = self._final_snapshot(p)
            elif target_unclean:
                # The target could not even be cleaned: it (or the way to it) is at fault, whatever the
                # controller's reason was, so the retry goes elsewhere.
                target_at_fault = True
        if outcome is Outcome.COMPLETED:
            try:
                self.driver.finalize(True)
            except DriverError as e:  # the droplet runs on the target; a leftover on the source is logged
                log.error("finalize after success failed (source copy may be left): %s", e)
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

    def _clean_up_failure(self) -> tuple[bool, bool]:
        """Source untouched (resumed, unthrottled), target clean. Each step tried even if another fails.

        Returns (completed, target_unclean): ``completed`` when the abort found the migration had completed
        (then nothing is cleaned: the target's copy is the droplet); ``target_unclean`` when a step failed
        because of the target.
        """
        try:
            self.driver.abort()
        except AlreadyCompleted as e:
            log.warning("abort: %s", e)
            return True, False
        except DriverError as e:
            log.warning("abort during clean-up failed: %s", e)
            if self._done_after_all():
                return True, False
        target_unclean = False
        steps: tuple[tuple[str, Callable[[], None]], ...] = (
            ("lift disk limit", lambda: self.driver.set_disk_write_limit(None)),
            ("lift throttle", lambda: self.driver.set_memory_throttle(0)),
            ("finalize(failure)", lambda: self.driver.finalize(False)),
        )
        for what, call in steps:
            try:
                call()
            except AlreadyCompleted as e:
                log.warning("%s: %s", what, e)
                return True, False
            except DriverError as e:
                log.warning("%s during clean-up failed: %s", what, e)
                target_unclean = target_unclean or e.target_at_fault
        return False, target_unclean

    def _done_after_all(self) -> bool:
        """After a failed abort: does the driver's own snapshot say the migration completed?"""
        try:
            return self.driver.progress().phase is Phase.DONE
        except DriverError:
            return False

    def _final_snapshot(self, fallback: Progress | None) -> Progress | None:
        """The completed job's last snapshot (its downtime and bytes), for the result."""
        try:
            p = self.driver.progress()
        except DriverError:
            return fallback
        if self.keep_trace:
            self.trace.append(p)
        return p if p.phase is Phase.DONE else fallback


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
        run.pause(tick_s)


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
