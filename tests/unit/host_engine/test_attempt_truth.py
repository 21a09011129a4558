"""An attempt's outcome follows the hypervisor's word (issue 11.1, 11.3), checked with a scripted driver.

The driver here is a fake at a boundary we own (``MigrationDriver``): it plays a hypervisor whose job
completes while the controller gives up, or whose target cannot be cleaned. Real libvirt runs the same
cases in tests/integration/test_libvirt_record.py.
"""

from __future__ import annotations

from dataclasses import replace

from host_engine.attempt import MigrationResult, MigrationRun, Outcome
from host_engine.controller import AbortReason, ControllerConfig
from host_engine.drivers.base import AlreadyCompleted, DriverError, Phase, Progress
from tests.fake_drivers import NoOpMigration, StepClock

MiB = 1024 * 1024

SWITCHING = Progress(
    phase=Phase.SWITCHOVER,
    elapsed_s=1.0,
    round=3,
    disk_total_bytes=64 * MiB,
    disk_processed_bytes=64 * MiB,
    disk_remaining_bytes=0,
    memory_total_bytes=128 * MiB,
    memory_processed_bytes=100 * MiB,
    memory_remaining_bytes=4 * MiB,
    disk_dirty_rate_bps=0.0,
    memory_dirty_rate_bps=8 * MiB,
    transfer_rate_bps=32 * MiB,
    bytes_transferred=170 * MiB,
)


class ScriptedDriver(NoOpMigration):
    """Reports a switchover that outlasts the controller's deadline; ``abort`` finds the job completed."""

    def __init__(self, clock: StepClock, *, completes: bool, target_reachable: bool = True) -> None:
        self.clock = clock
        self.completes = completes
        self.target_reachable = target_reachable
        self.finalized: list[bool] = []
        self.done = False

    def progress(self) -> Progress:
        if self.done:
            return replace(SWITCHING, phase=Phase.DONE, memory_remaining_bytes=0, downtime_ms=87.0)
        return replace(SWITCHING, elapsed_s=self.clock.now())

    def abort(self) -> None:
        if self.completes:
            self.done = True
            raise AlreadyCompleted("cannot abort: the migration completed and the target runs the droplet")
        if not self.target_reachable:
            raise DriverError("source checked; target not cleaned: connection refused", target_at_fault=True)

    def finalize(self, success: bool) -> None:
        self.finalized.append(success)
        if not success and not self.target_reachable:
            raise DriverError("source checked; target not cleaned: connection refused", target_at_fault=True)


def run(driver: ScriptedDriver, clock: StepClock) -> MigrationResult:
    run = MigrationRun(driver, ControllerConfig(), clock)
    assert run.begin()
    for _ in range(100):
        result = run.step()
        if result is not None:
            return result
        clock.sleep(0.5)
    raise AssertionError("the attempt never ended")


def test_attempt_completed_while_the_controller_gave_up_is_recorded_completed() -> None:
    clock = StepClock()
    driver = ScriptedDriver(clock, completes=True)
    result = run(driver, clock)
    assert result.outcome is Outcome.COMPLETED
    assert result.downtime_ms == 87.0  # the job's own figure
    assert result.abort_reason is None
    assert driver.finalized == [True]  # the source's copy is removed, the target's kept


def test_attempt_aborted_by_the_switchover_deadline_when_libvirt_did_not_complete() -> None:
    clock = StepClock()
    driver = ScriptedDriver(clock, completes=False)
    result = run(driver, clock)
    assert result.outcome is Outcome.ABORTED
    assert result.abort_reason is AbortReason.SWITCHOVER_TIMEOUT
    assert driver.finalized == [False]


def test_attempt_whose_target_cannot_be_cleaned_blames_the_target() -> None:
    """Whatever the controller's reason, a target that cannot even be cleaned is at fault: retry elsewhere."""
    clock = StepClock()
    driver = ScriptedDriver(clock, completes=False, target_reachable=False)
    result = run(driver, clock)
    assert result.outcome is Outcome.ABORTED
    assert result.target_at_fault
