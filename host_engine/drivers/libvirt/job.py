"""The state one migration attempt keeps, and the migration thread whose end is libvirt's word on the outcome.

:class:`MigrationJob` is the base of :class:`~host_engine.drivers.libvirt.migration.LibvirtMigration`: the
options it was given, its connections (the controller's, and the migration thread's own), its phase with one
transition table, and ``migrateToURI3`` running in a thread. When that thread returns, :meth:`_settle` decides
DONE or FAILED once, from which host runs the domain.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from host_engine.drivers.base import DriverError, MigrationSpec, Phase
from host_engine.drivers.libvirt.connection import alive, int_option, libvirt_module, open_uri
from host_engine.drivers.libvirt.disks import Disk
from host_engine.drivers.libvirt.events import MigrationEvents
from host_engine.drivers.libvirt.qmp import QEMU_MAX_THROTTLE_PCT, BlockDevices
from host_engine.drivers.libvirt.rates import RateEstimator
from host_engine.drivers.memory_left import MemoryLeftBound

log = logging.getLogger(__name__)

# A control call that failed is ignored if the migration job ends within this long (it raced the end).
END_RACE_WAIT_S = 2.0

# ``parallel_connections``: QEMU's multifd, memory sent over this many connections, each with its own sender
# thread; the pause's final pass is then not bound to one thread. Measured on the two-host harness (7 runs
# each, interleaved; docs/libvirt.md "Known problems"): an 8 MiB hot set paused 29 ms median with 4 against
# 40 with one connection (27 against 35 at a 32 MiB/s cap). 0 or 1: one connection, libvirt's default.
DEFAULT_PARALLEL_CONNECTIONS = 4
MAX_PARALLEL_CONNECTIONS = 255  # QEMU's multifd-channels maximum

# The driver's own lifecycle (Phase from base.py); anything else raises.
_TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.PREPARING: frozenset({Phase.DISK, Phase.MEMORY, Phase.SWITCHOVER, Phase.DONE, Phase.FAILED}),
    Phase.DISK: frozenset({Phase.MEMORY, Phase.SWITCHOVER, Phase.DONE, Phase.FAILED}),
    Phase.MEMORY: frozenset({Phase.SWITCHOVER, Phase.DONE, Phase.FAILED}),
    Phase.SWITCHOVER: frozenset({Phase.DONE, Phase.FAILED}),
    Phase.DONE: frozenset(),
    Phase.FAILED: frozenset(),
}
_ORDER = [Phase.PREPARING, Phase.DISK, Phase.MEMORY, Phase.SWITCHOVER, Phase.DONE]


class MigrationJob:
    """One attempt's state and migration thread (see the module docstring)."""

    @property
    def write_blocking_mirror(self) -> bool:
        """The write-blocking disk mirror is in effect (not for an offline copy: its guest is paused)."""
        return self.sync_writes and not self.spec.offline

    def __init__(
        self,
        spec: MigrationSpec,
        *,
        open_connection: Callable[[str], Any] = open_uri,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.spec = spec
        self._open = open_connection
        self._clock = clock
        opts = spec.options
        self.domain_name = opts.get("domain", spec.droplet_id)
        self.peer_uri = opts.get("peer_uri", spec.target_uri)
        self.migrate_uri = opts.get("migrate_uri")
        self.bandwidth_mibps = int_option(opts, "bandwidth_mibps", 0)
        self.auto_converge = opts.get("auto_converge", "controlled")
        if self.auto_converge not in ("controlled", "qemu", "off"):
            raise DriverError(
                f"options.auto_converge must be controlled, qemu or off, not {self.auto_converge!r}"
            )
        self.qemu_max_throttle_pct = int_option(opts, "auto_converge_max_pct", QEMU_MAX_THROTTLE_PCT)
        if not 1 <= self.qemu_max_throttle_pct <= QEMU_MAX_THROTTLE_PCT:
            raise DriverError(f"options.auto_converge_max_pct must be within 1..{QEMU_MAX_THROTTLE_PCT}")
        self.target_paused = opts.get("paused") == "1"
        tls = opts.get("tls", "0")
        if tls not in ("0", "1"):
            raise DriverError(f"options.tls must be 0 or 1, not {tls!r}")
        self.tls = tls == "1"
        self.keep_source_disks = opts.get("keep_source_disks") == "1"
        sync_writes = opts.get("sync_writes", "1")
        if sync_writes not in ("0", "1"):
            raise DriverError(f"options.sync_writes must be 0 or 1, not {sync_writes!r}")
        self.sync_writes = sync_writes == "1"
        self.parallel_connections = int_option(opts, "parallel_connections", DEFAULT_PARALLEL_CONNECTIONS)
        if self.parallel_connections > MAX_PARALLEL_CONNECTIONS:
            raise DriverError(
                f"options.parallel_connections must be within 0..{MAX_PARALLEL_CONNECTIONS} (0 or 1: one "
                f"connection), not {self.parallel_connections}"
            )
        self._max_downtime_ms: int | None = (
            int_option(opts, "max_downtime_ms", 0) if "max_downtime_ms" in opts else None
        )
        self._disk_limit_bps: int | None = None
        self._throttle_pct = 0
        self._phase = Phase.PREPARING
        self._lock = threading.Lock()
        self._src: Any = None
        self._dst: Any = None
        # The migration thread's own connection: a call in flight on a libvirt connection (migrateToURI3 runs
        # for the whole job) delays other calls on it by up to the 5 s keepalive interval (measured: jobStats,
        # state and blockStats took 5.0 s every few samples), so the controller's reads get their own.
        self._mig_conn: Any = None
        self._dom: Any = None
        self._uuid = ""
        self._disks: list[Disk] = []
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._started_at: float | None = None
        self._rates = RateEstimator()
        self._memory_left = MemoryLeftBound()
        self._devices = BlockDevices()
        self._last_stats: dict[str, Any] = {}
        self._events = MigrationEvents(spec.migration_id)
        self._started_offline_copy = False
        self._target_at_fault = False
        # The engine's reason when it aborts (``note_abort_reason``): libvirt's error after an abortJob says
        # only what QEMU saw ("operation failed: ... Input/output error"), never why the job was stopped.
        self._abort_reason: str | None = None
        self._failed_before_abort = False

    # -- connections ------------------------------------------------------------------------------------

    def _source(self) -> Any:
        if self._src is None or not alive(self._src):
            self._src = self._open(self.spec.source_uri)
        return self._src

    def _target(self) -> Any:
        if self._dst is None or not alive(self._dst):
            try:
                self._dst = self._open(self.spec.target_uri)
            except DriverError as e:
                raise DriverError(str(e), target_at_fault=True) from e
        return self._dst

    def _source_domain(self) -> Any:
        lv = libvirt_module()
        try:
            return self._source().lookupByName(self.domain_name)
        except lv.libvirtError as e:
            raise DriverError(f"{self.domain_name} not found on {self.spec.source_host}: {e}") from e

    # -- phase --------------------------------------------------------------------------------------------

    def _advance(self, phase: Phase) -> None:
        """Move forward to ``phase`` (a no-op when already there or past it in the normal order)."""
        with self._lock:
            if phase is self._phase:
                return
            if phase in _ORDER and self._phase in _ORDER and _ORDER.index(phase) < _ORDER.index(self._phase):
                return
            if phase not in _TRANSITIONS[self._phase]:
                raise DriverError(f"illegal driver transition {self._phase.value} -> {phase.value}")
            self._phase = phase

    # -- the migration thread -------------------------------------------------------------------------------

    def _running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait_ended(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for ``migrateToURI3`` to return (``attempt.MigrationRun.pause``: the
        controller reads the outcome at once instead of a tick later). True once it has."""
        thread = self._thread
        if thread is None:
            time.sleep(timeout_s)
            return False
        thread.join(timeout_s)
        return not thread.is_alive()

    @contextlib.contextmanager
    def _unless_ended(self) -> Iterator[None]:
        """A control call on the source that fails because the job has just ended is not an error.

        A small guest can finish its migration between one controller tick and the next call: the source
        domain is then gone (or stopped) and QEMU/libvirt refuse the call. The outcome is the job's.
        """
        lv = libvirt_module()
        try:
            yield
        except (DriverError, lv.libvirtError) as e:
            thread = self._thread
            if thread is not None:
                thread.join(END_RACE_WAIT_S)
                if not thread.is_alive():
                    log.info("migration %s: ignored, the job has ended: %s", self.spec.migration_id, e)
                    return
            if isinstance(e, DriverError):
                raise
            raise DriverError(str(e)) from e

    def _succeeded(self) -> bool:
        """The migration job has ended and the target holds the live copy now (see ``_settle``)."""
        self._settle()
        return self._phase is Phase.DONE

    def _settle(self) -> None:
        """Once the migration thread has returned: DONE or FAILED, from libvirt's word, decided once.

        ``migrateToURI3`` returning without error is the job's completion. When it reports an error, which
        host runs the domain decides: a target copy that runs while the source's does not is the droplet
        (libvirt resumes the target only after the source's QEMU sent its last page), whatever the error
        said.
        """
        thread = self._thread
        if thread is None or thread.is_alive() or self._phase in (Phase.DONE, Phase.FAILED):
            return
        if self._error is not None and self._target_runs_droplet():
            log.warning(
                "migration %s: migrateToURI3 reported %s, but %s runs the droplet and %s does not: completed",
                self.spec.migration_id,
                self._error,
                self.spec.target_host,
                self.spec.source_host,
            )
            self._error = None
        if self._error is None:
            self._advance(Phase.DONE)
        else:
            self._fail(self._error_text())

    def _target_runs_droplet(self) -> bool:
        """Whether the target holds the live copy: its domain runs (or, when asked to stay paused, is defined
        persistently, which libvirt does only at the end of the job) and the source's copy does not run."""
        lv = libvirt_module()
        try:
            tdom = self._target().lookupByUUIDString(self._uuid)
            state = tdom.state()[0]
            if state != lv.VIR_DOMAIN_RUNNING:
                paused_ok = self.target_paused or self.spec.offline
                if not (paused_ok and state == lv.VIR_DOMAIN_PAUSED and tdom.isPersistent()):
                    return False
        except (lv.libvirtError, DriverError):
            return False
        try:
            sdom = self._source().lookupByUUIDString(self._uuid)
            return not (sdom.isActive() and sdom.state()[0] == lv.VIR_DOMAIN_RUNNING)
        except lv.libvirtError:
            return True  # undefined on the source: the job's last step
        except DriverError:
            # The source cannot be asked; the target was resumed, which libvirt does only after the source
            # stopped for good.
            return True

    def note_abort_reason(self, reason: str) -> None:
        """The engine's reason for the abort that follows (``drivers.base.ExplainsAbort``): the failure's
        logged and reported error says it first, libvirt's text after it."""
        self._abort_reason = reason
        log.info("migration %s: %s", self.spec.migration_id, reason)

    def _migrate(self, dom: Any, params: dict[str, Any], flags: int) -> None:
        try:
            dom.migrateToURI3(self.peer_uri, params, flags)
        except BaseException as e:
            self._error = e
            self._failed_before_abort = self._abort_reason is None
            log.warning("migration %s: migrateToURI3 failed: %s", self.spec.migration_id, self._error_text())
        else:
            log.info("migration %s: migrateToURI3 returned", self.spec.migration_id)

    # -- progress -----------------------------------------------------------------------------------------

    def _error_text(self) -> str:
        """Why the job failed: the engine's abort reason when it aborted (libvirt's text in brackets),
        else libvirt's error."""
        if self._abort_reason is None:
            return str(self._error) if self._error is not None else "aborted"
        if self._error is None:
            return self._abort_reason
        if self._failed_before_abort:  # libvirt's own failure, before the engine decided to abort
            return f"{self._error} (then {self._abort_reason})"
        return f"{self._abort_reason} (libvirt: {self._error})"

    def _fail(self, why: str) -> None:
        if self._phase is Phase.FAILED:
            return
        if self._error is not None:
            self._target_at_fault = self._target_is_at_fault()
        self._advance(Phase.FAILED)
        log.warning("migration %s: failed: %s", self.spec.migration_id, why)

    def _target_is_at_fault(self) -> bool:
        lv = libvirt_module()
        err = self._error
        if isinstance(err, lv.libvirtError) and err.get_error_code() == lv.VIR_ERR_OPERATION_ABORTED:
            return False
        try:
            self._target()
        except DriverError:
            return True
        text = str(err).lower()
        return any(s in text for s in ("end of file", "connection", "target", "destination", "remote"))
