"""The driver protocol: how the executor drives one migration on a hypervisor.

A driver is the mechanism; the convergence controller (``host_engine.controller``) is the policy.
Phases follow Ganeti's hypervisor interface: ``prepare_target`` → ``start`` → (``progress`` and the
controller's actions, repeatedly) → ``switchover`` where the mechanism exposes it → ``finalize``.
``abort`` may be called at any point before switchover completes and must leave the source running
untouched and the target clean.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


class DomainState(enum.Enum):
    """A droplet's state on one host, as the hypervisor reports it."""

    RUNNING = "running"
    PAUSED = "paused"
    SHUT_OFF = "shut_off"
    ABSENT = "absent"


class Phase(enum.Enum):
    """Where a running migration is. ``DONE`` means the target runs the droplet."""

    PREPARING = "preparing"
    DISK = "disk"
    MEMORY = "memory"
    SWITCHOVER = "switchover"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class MigrationSpec:
    """What to move and where: everything a driver needs, nothing from the store."""

    migration_id: str
    droplet_id: str
    source_host: str
    target_host: str
    source_uri: str
    target_uri: str
    vcpus: int
    memory_bytes: int
    disk_bytes: int
    offline: bool = False
    power_on_after: bool = True
    # Driver-specific settings (e.g. libvirt's migration address); plain JSON-able values.
    options: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Progress:
    """A snapshot of a running migration, as the controller sees it. Rates in bytes per second.

    The three rates are averages over the last ``rate_window_s`` seconds, which each driver states so a
    policy tuned on one driver can allow for the other: the sim measures over 1 s windows (like QEMU's
    dirty-rate sync), libvirt averages ``transfer_rate_bps`` and ``disk_dirty_rate_bps`` over 8 s (QEMU's
    disk mirror moves data in bursts; one-tick deltas swing between zero and line rate), while its
    ``memory_dirty_rate_bps`` is QEMU's own, measured over the last dirty sync (~1 s).
    """

    phase: Phase
    elapsed_s: float
    round: int
    disk_total_bytes: int
    disk_processed_bytes: int
    disk_remaining_bytes: int
    memory_total_bytes: int
    memory_processed_bytes: int
    memory_remaining_bytes: int
    disk_dirty_rate_bps: float
    memory_dirty_rate_bps: float
    transfer_rate_bps: float
    disk_write_limit_bps: int | None = None
    memory_throttle_pct: int = 0
    # The throttle the hypervisor reports in force (QEMU applies a requested level at its next dirty sync);
    # None when the driver cannot tell, and then the controller takes the requested level as in force.
    memory_throttle_in_force_pct: int | None = None
    downtime_ms: float | None = None
    bytes_transferred: int = 0
    error: str | None = None
    # With phase FAILED: whether the target (host, disk, link end) caused it, so a retry picks another one.
    target_at_fault: bool = False
    # The span the rates above are averaged over (see the class docstring); 0.0 when the driver does not say.
    rate_window_s: float = 0.0


class DriverError(Exception):
    """A driver operation failed. ``target_at_fault`` tells the retry policy to pick another target."""

    def __init__(self, message: str, *, target_at_fault: bool = False) -> None:
        super().__init__(message)
        self.target_at_fault = target_at_fault


@dataclass(frozen=True)
class Recovered:
    """What ``HypervisorDriver.recover`` found: the host that runs the droplet, and what the hypervisor still
    knows of the orphaned attempt (``downtime_ms``, ``bytes_transferred``, ``duration_s``, ``rounds``;
    empty when it knows nothing). A driver may return the bare host name instead."""

    host: str
    stats: dict[str, object] = field(default_factory=dict)


class AlreadyCompleted(DriverError):
    """``abort()`` came too late: the hypervisor completed the migration and the target runs the droplet.

    The attempt's outcome is then ``COMPLETED`` whatever the caller wanted (a controller's timeout, an
    operator's abort): the record follows the hypervisor's word, never the reverse.
    """


@runtime_checkable
class MigrationDriver(Protocol):
    """One migration's handle. Created per migration by ``HypervisorDriver.migration(spec)``.

    What the executor's loop (``host_engine.attempt.run_migration``) relies on: ``progress()`` reports a
    failure as ``phase=FAILED`` with ``error`` and ``target_at_fault`` (an exception is for a call that could
    not be made at all); ``switchover()`` returns at once and later snapshots show ``SWITCHOVER`` then
    ``DONE``; after ``DONE`` the ``set_*`` calls are no-ops (the source is gone, the target never had a
    limit); after a failure the loop calls ``abort()``, ``set_disk_write_limit(None)``,
    ``set_memory_throttle(0)`` and ``finalize(False)``, each of which may find nothing left to do.
    """

    def prepare_target(self) -> None:
        """Create what the target needs (disks of the right size, network) before data moves."""

    def start(self) -> None:
        """Begin copying (disk mirror, then memory pre-copy). Returns at once; work goes on."""

    def progress(self) -> Progress:
        """The current snapshot. Cheap; called every controller tick."""

    def set_disk_write_limit(self, bytes_per_s: int | None) -> None:
        """Throttle the source droplet's disk writes (None lifts it). Never left on the target."""

    def set_memory_throttle(self, percent: int) -> None:
        """Slow the source droplet's vCPUs by ``percent`` (0 lifts it) so memory copying can catch up."""

    def set_max_downtime(self, ms: int) -> None:
        """The longest pause allowed at switchover."""

    def switchover(self) -> None:
        """Pause the source, copy the remainder, resume on the target (where the mechanism exposes it)."""

    def abort(self) -> None:
        """Stop the migration: source keeps running untouched, target holds nothing of the droplet."""

    def finalize(self, success: bool) -> None:
        """Clean up: on success the source holds nothing; on failure the target holds nothing."""


@runtime_checkable
class ExplainsAbort(Protocol):
    """A driver that can be told why the engine aborts before ``abort()`` is called: its logs and its
    failure's error then name the engine's reason, not only the hypervisor's text (optional)."""

    def note_abort_reason(self, reason: str) -> None:
        """The engine's reason for the abort that follows (e.g. ``aborted by the controller: ...``)."""


@runtime_checkable
class HypervisorDriver(Protocol):
    """A hypervisor back end (libvirt, sim): hands out one ``MigrationDriver`` per migration."""

    def migration(self, spec: MigrationSpec) -> MigrationDriver:
        """A handle for moving ``spec.droplet_id`` from ``spec.source_host`` to ``spec.target_host``."""

    def domain_state(self, host: str, droplet_id: str) -> DomainState:
        """The droplet's state on ``host`` (``ABSENT`` when the host does not hold it)."""

    def recover(self, spec: MigrationSpec) -> str | Recovered:
        """After a worker died mid-migration: make the droplet run on exactly one host and return that host.

        Cancels any migration job still running for ``spec`` (and lifts what the dead worker applied to the
        guest: throttle, disk write limit); if switchover had not completed, the source is resumed (if
        paused) and the target cleaned, and ``spec.source_host`` is returned; if it had, the source copy and
        its disks are removed and ``spec.target_host`` is returned, with the job's own stats when the
        hypervisor still has them (``Recovered``). Idempotent.
        """
