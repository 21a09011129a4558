"""One attempt at moving one domain between two libvirt hosts: :class:`LibvirtMigration`, the
``MigrationDriver`` the executor drives (how each step works: the package docstring and docs/libvirt.md).

Built on :class:`~host_engine.drivers.libvirt.reporting.ProgressReporter` (``progress()``) and
:class:`~host_engine.drivers.libvirt.job.MigrationJob` (state, connections, the migration thread); QEMU's
controls are :mod:`~host_engine.drivers.libvirt.qmp`, volumes :mod:`~host_engine.drivers.libvirt.storage`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from host_engine.drivers.base import AlreadyCompleted, DriverError, MigrationDriver, MigrationSpec, Phase
from host_engine.drivers.libvirt.connection import errors, libvirt_module, open_uri
from host_engine.drivers.libvirt.disks import Disk, device_alias, domain_disks, read_disks
from host_engine.drivers.libvirt.events import EventLoop
from host_engine.drivers.libvirt.qmp import (
    DISARMED_THROTTLE_PCT,
    apply_max_downtime,
    io_throttle_args,
    qmp,
    throttle_parameters,
)
from host_engine.drivers.libvirt.reporting import ProgressReporter
from host_engine.drivers.libvirt.storage import create_volume, delete_volume, destroy_and_undefine

log = logging.getLogger(__name__)

# How long abort() waits for the migration thread after abortJob (QEMU cancels within a second or two).
ABORT_WAIT_S = 60.0
# finalize(True) waits this long for the migration thread to return (the job completed event comes first).
FINALIZE_WAIT_S = 120.0


class LibvirtMigration(ProgressReporter, MigrationDriver):
    """One attempt at moving one domain between two libvirt hosts (see the package docstring).

    ``spec.options`` (all strings):
      ``domain``: the domain's name (default: ``spec.droplet_id``);
      ``peer_uri``: how the source libvirtd reaches the target's (default: ``spec.target_uri``);
      ``migrate_uri``: the address QEMU sends to (default: the target's ``migration_host``);
      ``bandwidth_mibps``: the bandwidth cap, set when the migration starts (default: unlimited);
      ``max_downtime_ms``: the initial downtime limit (default: QEMU's, 300 ms);
      ``auto_converge``: ``controlled`` (default), ``qemu`` or ``off``;
      ``auto_converge_max_pct``: with ``qemu``, QEMU's throttle cap (default 99, QEMU's own);
      ``paused``: ``1`` leaves the target paused at switchover (``VIR_MIGRATE_PAUSED``);
      ``tls``: ``1`` asks QEMU to encrypt the memory stream and the disk mirror (``VIR_MIGRATE_TLS``; both
      daemons need QEMU's migration certificates, else libvirt refuses the migration);
      ``keep_source_disks``: ``1`` keeps the source's disk files after success;
      ``sync_writes``: ``1`` (default) mirrors the disks in write-blocking mode
      (``VIR_MIGRATE_NON_SHARED_SYNCHRONOUS_WRITES``): a guest write completes once it is on both hosts, so
      the mirror never falls behind and the pause carries no disk remainder; ``0``: libvirt's background
      mirror, whose dirty blocks are copied inside the pause;
      ``parallel_connections``: memory over this many connections (QEMU's multifd, ``VIR_MIGRATE_PARALLEL``;
      default 4; ``0`` or ``1``: one connection, libvirt's default).
    Neither applies to an offline copy (the guest is paused and has no memory to send).
    """

    def __init__(
        self,
        spec: MigrationSpec,
        *,
        open_connection: Callable[[str], Any] = open_uri,
        clock: Callable[[], float] = time.monotonic,
        on_leftover: Callable[[LibvirtMigration], None] | None = None,
    ) -> None:
        super().__init__(spec, open_connection=open_connection, clock=clock)
        # Told when the target could not be cleaned (unreachable): the hypervisor retries in the background.
        self._on_leftover = on_leftover
        self._created_volumes: list[str] = []

    # Each step turns libvirt's exceptions into DriverError, which is what the executor handles.

    def prepare_target(self) -> None:
        with errors(f"preparing {self.spec.target_host}", target_at_fault=True):
            self._prepare_target()

    def start(self) -> None:
        with errors("starting the migration"):
            self._start()

    def switchover(self) -> None:
        with errors("switchover"):
            self._switchover()

    def abort(self) -> None:
        with errors("abort"):
            self._abort()

    def finalize(self, success: bool) -> None:
        with errors("finalize"):
            if success:
                self._finalize_success()
            else:
                self._abort()
        self.close()

    def close(self) -> None:
        """Close this attempt's connections (reopened if the handle is used again)."""
        self._events.unregister()
        if self._open is not open_uri:
            return  # injected connections belong to the caller
        for conn in (self._src, self._dst, self._mig_conn):
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
        self._src = self._dst = self._mig_conn = None

    def _prepare_target(self) -> None:
        EventLoop.ensure()
        lv = libvirt_module()
        dom = self._dom = self._source_domain()
        self._uuid = dom.UUIDString()
        active = bool(dom.isActive())
        if self.spec.offline and active:
            raise DriverError(f"{self.domain_name} runs on {self.spec.source_host}: not an offline migration")
        if not self.spec.offline and not active:
            raise DriverError(
                f"{self.domain_name} is shut off on {self.spec.source_host}: migrate it offline"
            )
        self._disks = read_disks(dom, sized=True)
        if not self._disks:
            raise DriverError(f"{self.domain_name} has no disk to migrate")
        try:
            self.remove_target_leftovers()
            for disk in self._disks:
                self._create_target_volume(disk)
        except lv.libvirtError as e:
            raise DriverError(f"preparing {self.spec.target_host} failed: {e}", target_at_fault=True) from e
        log.info(
            "migration %s: target %s prepared (%d disk(s))",
            self.spec.migration_id,
            self.spec.target_host,
            len(self._disks),
        )

    def _start(self) -> None:
        lv = libvirt_module()
        if self._dom is None:
            raise DriverError("start() before prepare_target()")
        dom = self._dom
        self._events.register(self._source(), self._dom)
        if self.spec.offline:
            # Start paused: the guest never runs on the source; the migration only carries its disks.
            try:
                dom.createWithFlags(lv.VIR_DOMAIN_START_PAUSED)
            except lv.libvirtError as e:
                raise DriverError(f"cannot start {self.domain_name} paused for the copy: {e}") from e
            self._started_offline_copy = True
            self._disks = [
                Disk(d.target, d.path, d.format, d.size_bytes, device_alias(dom, d.target), d.iotune)
                for d in self._disks
            ]
        elif any(not d.alias for d in self._disks):
            self._disks = [
                Disk(d.target, d.path, d.format, d.size_bytes, device_alias(dom, d.target), d.iotune)
                for d in self._disks
            ]
        if self._max_downtime_ms is not None:
            self._apply_max_downtime(self._max_downtime_ms)
        params: dict[str, Any] = {
            lv.VIR_MIGRATE_PARAM_MIGRATE_DISKS: [d.target for d in self._disks],
            lv.VIR_MIGRATE_PARAM_DEST_NAME: self.domain_name,
        }
        if self.migrate_uri:
            params[lv.VIR_MIGRATE_PARAM_URI] = self.migrate_uri
        if self.bandwidth_mibps > 0:
            params[lv.VIR_MIGRATE_PARAM_BANDWIDTH] = self.bandwidth_mibps
        flags = (
            lv.VIR_MIGRATE_LIVE
            | lv.VIR_MIGRATE_PEER2PEER
            | lv.VIR_MIGRATE_NON_SHARED_DISK
            | lv.VIR_MIGRATE_PERSIST_DEST
            | lv.VIR_MIGRATE_UNDEFINE_SOURCE
        )
        if self.auto_converge != "off" and not self.spec.offline:
            flags |= lv.VIR_MIGRATE_AUTO_CONVERGE
        if self.auto_converge == "controlled" and not self.spec.offline:
            initial = self._throttle_pct or DISARMED_THROTTLE_PCT
            params[lv.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INITIAL] = initial
            params[lv.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INCREMENT] = 1
        if self.target_paused or self.spec.offline:
            flags |= lv.VIR_MIGRATE_PAUSED
        if self.tls:
            flags |= lv.VIR_MIGRATE_TLS
        if not self.spec.offline:
            flags |= self._fast_switchover_flags(lv, params)
        self._throttle_before_job()
        mig_dom = self._migration_domain()
        self._started_at = self._clock()
        self._thread = threading.Thread(
            target=self._migrate,
            args=(mig_dom, params, flags),
            name=f"migrate-{self.spec.migration_id}",
            daemon=True,
        )
        self._thread.start()
        log.info(
            "migration %s: %s → %s started (bandwidth cap %s MiB/s, flags %#x)",
            self.spec.migration_id,
            self.spec.source_host,
            self.spec.target_host,
            self.bandwidth_mibps or "no",
            flags,
        )

    def _throttle_before_job(self) -> None:
        """Set the controller's throttle level (disarmed at 0) in QEMU before the job starts.

        libvirt sets only the throttle's initial level and increment from the migration parameters and
        leaves max-cpu-throttle and the trigger threshold as QEMU has them, so the job starts under the
        controller's level, and start() returns at once instead of waiting for the job to appear (waiting
        took seconds and hid a small guest's disk phase from the controller).
        """
        if self.spec.offline or self.auto_converge == "off":
            return
        try:
            if self.auto_converge == "controlled":
                self._apply_throttle(self._throttle_pct)
            else:
                # QEMU's own policy, with its defaults (a parameter set by an earlier attempt persists in
                # the QEMU process) or the cap asked for.
                arguments = {"max-cpu-throttle": self.qemu_max_throttle_pct, "throttle-trigger-threshold": 50}
                qmp(self._dom, "migrate-set-parameters", arguments)
        except DriverError as e:
            log.warning("migration %s: throttle parameters not set: %s", self.spec.migration_id, e)

    def _migration_domain(self) -> Any:
        """The source domain on a connection of the migration thread's own (see ``_mig_conn``).

        Injected connections (libvirt's test driver in unit tests) are shared: the domain handle is reused.
        """
        if self._open is not open_uri:
            return self._dom
        lv = libvirt_module()
        self._mig_conn = self._open(self.spec.source_uri)
        try:
            return self._mig_conn.lookupByUUIDString(self._uuid)
        except lv.libvirtError as e:
            raise DriverError(f"{self.domain_name} not found on {self.spec.source_host}: {e}") from e

    def set_disk_write_limit(self, bytes_per_s: int | None) -> None:
        lv = libvirt_module()
        if bytes_per_s is not None and bytes_per_s <= 0:
            raise DriverError("a disk write limit must be positive (None lifts it)")
        if self._succeeded() or self._dom is None:
            # Before start: nothing runs yet. After switchover: the source QEMU (and its limit) is gone, and
            # the target never had it.
            self._disk_limit_bps = None if self._succeeded() else bytes_per_s
            return
        try:
            if not self._dom.isActive():
                self._disk_limit_bps = None
                return
        except lv.libvirtError:
            self._disk_limit_bps = None
            return
        with self._unless_ended():
            for disk in self._disks:
                qmp(self._dom, "block_set_io_throttle", self._io_throttle_args(disk, bytes_per_s))
        self._disk_limit_bps = None if self._succeeded() else bytes_per_s
        log.info(
            "migration %s: disk write limit on %s: %s",
            self.spec.migration_id,
            self.spec.source_host,
            f"{bytes_per_s} B/s" if bytes_per_s else "lifted",
        )

    def set_memory_throttle(self, percent: int) -> None:
        if not 0 <= percent <= 99:
            raise DriverError("memory throttle must be within 0..99 %")
        if not self._running():
            # Before start: used as the initial level. After the job: QEMU dropped its throttle already.
            self._throttle_pct = percent if self._thread is None else 0
            return
        if self.auto_converge != "controlled":
            log.warning(
                "migration %s: memory throttle %d %% ignored: auto_converge is %s",
                self.spec.migration_id,
                percent,
                self.auto_converge,
            )
            return
        if percent < self._throttle_pct and percent > 0:
            log.info(
                "migration %s: QEMU cannot lower a throttle mid-migration; keeping it", self.spec.migration_id
            )
            return
        with self._unless_ended():
            self._apply_throttle(percent)
        self._throttle_pct = percent if self._running() else 0

    def set_max_downtime(self, ms: int) -> None:
        if ms <= 0:
            raise DriverError("max downtime must be positive")
        self._max_downtime_ms = ms
        if self._dom is not None and self._thread is not None:
            with self._unless_ended():
                self._apply_max_downtime(ms)

    def _fast_switchover_flags(self, lv: Any, params: dict[str, Any]) -> int:
        """The write-blocking mirror and multifd (options ``sync_writes``, ``parallel_connections``): both
        shorten the pause, measured on the real harness (docs/libvirt.md, "Known problems"). ``params`` gets
        the connection count."""
        flags = 0
        if self.write_blocking_mirror and self._disks:
            flags |= lv.VIR_MIGRATE_NON_SHARED_SYNCHRONOUS_WRITES
        if self.parallel_connections > 1:
            flags |= lv.VIR_MIGRATE_PARALLEL
            params[lv.VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS] = self.parallel_connections
        return flags

    def _switchover(self) -> None:
        if self._dom is None or self._thread is None:
            raise DriverError("switchover() before start()")
        phase = self.progress().phase
        if phase in (Phase.SWITCHOVER, Phase.DONE):
            return
        if phase is not Phase.MEMORY:
            # Pausing while the disk mirror still copies would pause the guest for the whole copy.
            log.info(
                "migration %s: switchover asked in phase %s: not yet", self.spec.migration_id, phase.value
            )
            return
        with self._unless_ended():
            self._dom.suspend()
        if not self._running():
            return
        self._advance(Phase.SWITCHOVER)
        log.info("migration %s: switchover: source paused", self.spec.migration_id)

    def _abort(self) -> None:
        """``abortJob``, wait for the job's end, then let libvirt's outcome decide: a job that completed
        anyway (the abort came during its last steps) raises ``AlreadyCompleted`` and nothing is cleaned up
        (the target's copy is the droplet now); otherwise the source is checked and the target cleaned."""
        lv = libvirt_module()
        thread = self._thread
        if thread is not None and thread.is_alive() and self._dom is not None:
            try:
                self._dom.abortJob()
            except lv.libvirtError as e:
                log.warning("migration %s: abortJob: %s", self.spec.migration_id, e)
            thread.join(ABORT_WAIT_S)
            if thread.is_alive():
                raise DriverError(f"the migration job did not stop within {ABORT_WAIT_S:.0f} s of abortJob")
        if self._succeeded():
            raise AlreadyCompleted("cannot abort: the migration completed and the target runs the droplet")
        if self._phase is not Phase.FAILED:
            self._fail(self._error_text())
        self._clean_after_failure()

    def _finalize_success(self) -> None:
        thread = self._thread
        if thread is None:
            raise DriverError("finalize(True) before start()")
        thread.join(FINALIZE_WAIT_S)
        if thread.is_alive() or not self._succeeded():
            raise DriverError(f"finalize(True) but the migration did not succeed: {self._error}")
        lv = libvirt_module()
        try:
            tdom = self._target().lookupByUUIDString(self._uuid)
        except lv.libvirtError as e:
            raise DriverError(f"the target does not hold {self.domain_name} after migration: {e}") from e
        if self.spec.offline:
            if self.spec.power_on_after:
                tdom.resume()
            else:
                tdom.destroy()
        elif not self.target_paused:
            state, _reason = tdom.state()
            if state == lv.VIR_DOMAIN_PAUSED:
                tdom.resume()
        self._events.unregister()
        src = self._source()
        with contextlib.suppress(lv.libvirtError):
            leftover = src.lookupByUUIDString(self._uuid)
            if leftover.isActive():
                raise DriverError(f"{self.domain_name} still runs on {self.spec.source_host} after migration")
            leftover.undefine()
        if not self.keep_source_disks:
            for disk in self._disks:
                delete_volume(src, disk.path)
        log.info("migration %s: finalized on %s", self.spec.migration_id, self.spec.target_host)

    def _apply_throttle(self, percent: int) -> None:
        qmp(self._dom, "migrate-set-parameters", throttle_parameters(percent, self._throttle_pct))

    def _apply_max_downtime(self, ms: int) -> None:
        apply_max_downtime(self._dom, ms)

    def _io_throttle_args(self, disk: Disk, write_bps: int | None) -> dict[str, Any]:
        return io_throttle_args(self._devices.qdev(self._dom, disk), disk, write_bps)

    def remove_target_leftovers(self) -> None:
        """Remove what an earlier attempt left on the target; refuse if another domain uses the paths."""
        lv = libvirt_module()
        conn = self._target()
        paths = {d.path for d in self._disks}
        for tdom in conn.listAllDomains(0):
            same = tdom.UUIDString() == self._uuid or tdom.name() == self.domain_name
            if not same:
                clash = paths & {p for _, p, _, _ in domain_disks(tdom)}
                if clash:
                    raise DriverError(
                        f"{self.spec.target_host} uses {sorted(clash)} for {tdom.name()}",
                        target_at_fault=True,
                    )
                continue
            # Which copy is the droplet? The source's, when it runs (live) or is shut off (offline) here:
            # libvirt resumes a target only after the source stopped for good. A target copy that runs
            # while the source copy is paused may be the live one: never guess, leave it to recover().
            src_state = self._dom.state()[0]
            source_is_droplet = src_state == lv.VIR_DOMAIN_RUNNING or (
                self.spec.offline and src_state == lv.VIR_DOMAIN_SHUTOFF
            )
            if not source_is_droplet or (tdom.isActive() and tdom.state()[0] == lv.VIR_DOMAIN_RUNNING):
                raise DriverError(
                    f"{self.domain_name} exists on {self.spec.target_host} and may be live there; "
                    "resolve with recover()",
                    target_at_fault=True,
                )
            log.warning(
                "migration %s: removing leftover %s from %s",
                self.spec.migration_id,
                tdom.name(),
                self.spec.target_host,
            )
            destroy_and_undefine(tdom)
        for disk in self._disks:
            delete_volume(conn, disk.path)

    def _create_target_volume(self, disk: Disk) -> None:
        create_volume(self._target(), disk, self.spec.target_host)
        self._created_volumes.append(disk.path)

    def _clean_after_failure(self) -> None:
        """Lift the throttle, make sure the source runs (or is shut off again), clean the target."""
        lv = libvirt_module()
        self._events.unregister()
        problems = []
        try:
            dom = self._source().lookupByUUIDString(self._uuid) if self._uuid else None
        except lv.libvirtError as e:
            raise DriverError(f"the source lost {self.domain_name} during a failed migration: {e}") from e
        if dom is not None:
            if self._started_offline_copy:
                with contextlib.suppress(lv.libvirtError):
                    dom.destroy()
            elif dom.isActive():
                if self._disk_limit_bps is not None:
                    try:
                        for disk in self._disks:
                            qmp(dom, "block_set_io_throttle", self._io_throttle_args(disk, None))
                        self._disk_limit_bps = None
                    except DriverError as e:
                        problems.append(f"lifting the disk write limit: {e}")
                state, _reason = dom.state()
                if state == lv.VIR_DOMAIN_PAUSED:
                    dom.resume()
            elif not self.spec.offline:
                problems.append(f"{self.domain_name} is not running on {self.spec.source_host}")
        try:
            self.cleanup_target()
        except DriverError as e:
            if self._on_leftover is not None:
                self._on_leftover(self)
            raise DriverError(
                f"source checked; target not cleaned: {e}" + (f"; {'; '.join(problems)}" if problems else ""),
                target_at_fault=True,
            ) from e
        if problems:
            raise DriverError("; ".join(problems))

    def cleanup_target(self) -> None:
        """Remove this droplet's domain and this attempt's disks from the target. Idempotent.

        A target copy that *runs* is never removed here: after a failed attempt only a paused incoming copy
        can be there, and a running one may be the droplet (``LibvirtHypervisor.recover`` decides that).
        """
        lv = libvirt_module()
        try:
            conn = self._target()
            with contextlib.suppress(lv.libvirtError):
                tdom = conn.lookupByUUIDString(self._uuid)
                if tdom.isActive() and tdom.state()[0] == lv.VIR_DOMAIN_RUNNING:
                    raise DriverError(f"{self.domain_name} runs on {self.spec.target_host}: not removed")
                destroy_and_undefine(tdom)
            # Only volumes this attempt created: a path the target uses otherwise is never touched.
            for path in list(self._created_volumes):
                delete_volume(conn, path)
                self._created_volumes.remove(path)
        except lv.libvirtError as e:
            raise DriverError(f"cleaning {self.spec.target_host} failed: {e}", target_at_fault=True) from e

    # -- what recovery uses (host_engine.drivers.libvirt.recovery) ------------------------------------------

    def connections(self) -> tuple[Any, Any]:
        """(source, target) connections, opened on first use (the target's failure says it is at fault)."""
        return self._source(), self._target()

    def adopt_source_copy(self, dom: Any) -> list[Disk]:
        """Take ``dom``, the source's copy recovery found, as this attempt's domain; its disks."""
        self._dom = dom
        self._uuid = dom.UUIDString()
        self._disks = [Disk(t, p, f, 0, "") for t, p, f, _ in domain_disks(dom)]
        return list(self._disks)
