"""An attempt notices its job's end at once, not a controller tick later (issue 11.6: the CLI spent 1-4 s
more than the attempt; up to a tick of it went between libvirt's job returning and the engine reading so).

The driver here is a stand-in for the libvirt one at our own seam (``MigrationDriver``): its job runs on a
thread of its own and ends after ``JOB_S``; like the libvirt driver it offers ``wait_ended``. The tick is
long (``TICK_S``), so an attempt that sleeps out its tick after the job ended is seconds late.
"""

from __future__ import annotations

import threading
import time

from host_engine.attempt import MigrationRun, Outcome, RealClock, run_migration
from host_engine.controller import ControllerConfig
from host_engine.drivers.base import Phase, Progress
from tests.fake_drivers import NoOpMigration

MiB = 1024 * 1024
JOB_S = 1.0
TICK_S = 4.0


class ThreadedJob(NoOpMigration):
    """A migration job on its own thread that completes by itself after ``JOB_S`` (its controls do nothing)."""

    def __init__(self) -> None:
        self.started_at: float | None = None
        self.ended = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.started_at = time.monotonic()
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def _run(self) -> None:
        self.ended.wait(JOB_S)
        self.ended.set()

    def wait_ended(self, timeout_s: float) -> bool:
        return self.ended.wait(timeout_s)

    def progress(self) -> Progress:
        done = self.ended.is_set()
        left = 0 if done else 64 * MiB
        return Progress(
            phase=Phase.DONE if done else Phase.DISK,
            elapsed_s=time.monotonic() - (self.started_at or time.monotonic()),
            round=0,
            disk_total_bytes=64 * MiB,
            disk_processed_bytes=64 * MiB - left,
            disk_remaining_bytes=left,
            memory_total_bytes=128 * MiB,
            memory_processed_bytes=0,
            memory_remaining_bytes=128 * MiB,
            disk_dirty_rate_bps=0.0,
            memory_dirty_rate_bps=0.0,
            transfer_rate_bps=64 * MiB,
            downtime_ms=40.0 if done else None,
        )


def test_an_attempt_ends_when_its_job_does_not_a_tick_later() -> None:
    job = ThreadedJob()
    started = time.monotonic()
    result = run_migration(job, ControllerConfig(), RealClock(), tick_s=TICK_S)
    took_s = time.monotonic() - started
    assert result.outcome is Outcome.COMPLETED
    assert took_s < JOB_S + 1.5, took_s  # a tick late would be TICK_S


def test_a_driver_that_keeps_saying_ended_does_not_spin_the_controller() -> None:
    """Once the job has ended, the ticks are regular again (the attempt may still be settling)."""
    job = ThreadedJob()
    job.ended.set()
    run = MigrationRun(job, ControllerConfig(), RealClock())
    started = time.monotonic()
    run.pause(0.5)
    run.pause(0.5)
    assert time.monotonic() - started >= 0.5
