"""Fakes at the engine's driver seam (``host_engine.drivers.base``, a boundary we own), for tests that play a
hypervisor by hand.

``NoOpMigration`` is a ``MigrationDriver`` whose controls do nothing: a fake writes only what its test is
about (what ``progress`` reports, an ``abort`` that finds the job completed, a ``finalize`` that cannot reach
the target, ...) and inherits the rest. ``StepClock`` is the monotonic clock (``host_engine.attempt.Clock``)
that an attempt and the executor run on, moved by hand: ``sleep`` advances it instead of sleeping.
"""

from __future__ import annotations

from host_engine.drivers.base import Progress


class NoOpMigration:
    """A ``MigrationDriver`` whose every control is a no-op; a subclass gives ``progress`` and overrides
    what its test needs to behave."""

    def progress(self) -> Progress:
        """The snapshot the fake hypervisor reports: the one thing every fake must say for itself."""
        raise NotImplementedError(f"{type(self).__name__} must say what its hypervisor reports")

    def prepare_target(self) -> None:
        pass

    def start(self) -> None:
        pass

    def set_disk_write_limit(self, bytes_per_s: int | None) -> None:
        pass

    def set_memory_throttle(self, percent: int) -> None:
        pass

    def set_max_downtime(self, ms: int) -> None:
        pass

    def switchover(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def finalize(self, success: bool) -> None:
        pass


class StepClock:
    """The monotonic clock an attempt or the executor runs on, moved only by ``sleep`` (from 0 s)."""

    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds
