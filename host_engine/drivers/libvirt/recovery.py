"""After a worker died mid-migration: make the droplet live on exactly one host.

``HypervisorDriver.recover`` for libvirt.

A job still running (its worker died; libvirt's peer-to-peer job carries on alone) is aborted and waited
for: nothing runs unsupervised, and QEMU drops its CPU throttle when the job ends. Then libvirt's word
decides: the switchover completed when the target's copy *runs* (libvirt resumes it only after the source's
QEMU sent its last page) or the source no longer has the domain; then the source's copy and disks are
removed, as ``finalize(True)`` does, and the job's own stats (downtime, bytes, from the target's
completed-job record) are returned. Otherwise the source copy is the droplet: its disk write limit is
lifted, it is resumed (or, offline, shut off again) and the target's leftovers are removed.

Works through :class:`~host_engine.drivers.libvirt.migration.LibvirtMigration`'s public methods
(``connections``, ``adopt_source_copy``, ``remove_target_leftovers``) and the storage and QMP modules.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from host_engine.drivers.base import DriverError, Recovered
from host_engine.drivers.libvirt.connection import libvirt_module, lookup
from host_engine.drivers.libvirt.disks import disk_size, domain_disks, read_disks
from host_engine.drivers.libvirt.migration import LibvirtMigration
from host_engine.drivers.libvirt.qmp import BlockDevices, io_throttle_args, names_device, qmp, qmp_list
from host_engine.drivers.libvirt.storage import delete_volume, destroy_and_undefine, volume_exists

log = logging.getLogger(__name__)

# How long to wait for an orphaned job to end after abortJob, and how often to look.
RECOVER_JOB_WAIT_S = 60.0
RECOVER_POLL_S = 0.2


def recover(mig: LibvirtMigration) -> Recovered:
    """Make ``mig.spec``'s droplet run on exactly one host and say which (see the module docstring).

    ``mig`` is a fresh handle for the orphaned attempt's spec; it is closed here.
    """
    lv = libvirt_module()
    spec = mig.spec
    try:
        src, dst = mig.connections()
        sdom = lookup(src, mig.domain_name)
        if sdom is not None and job_active(sdom):
            log.warning("recover %s: aborting the orphaned migration job", spec.migration_id)
            with contextlib.suppress(lv.libvirtError):
                sdom.abortJob()
            wait_job_end(sdom)
            sdom = lookup(src, mig.domain_name)
        tdom = lookup(dst, mig.domain_name)
        if sdom is None or (tdom is not None and tdom.state()[0] == lv.VIR_DOMAIN_RUNNING):
            return _recovered_on_target(mig, src, sdom, tdom)
        return _recovered_on_source(mig, dst, sdom, tdom)
    except lv.libvirtError as e:
        raise DriverError(f"recovering {spec.migration_id} failed: {e}") from e
    finally:
        mig.close()


def _recovered_on_target(mig: LibvirtMigration, src: Any, sdom: Any, tdom: Any) -> Recovered:
    """The switchover completed: remove the source's copy and disks; the job's stats from the target."""
    spec = mig.spec
    if tdom is None:
        raise DriverError(f"{mig.domain_name} is on neither {spec.source_host} nor {spec.target_host}")
    stats = completed_job_stats(tdom)
    if sdom is not None:
        log.warning("recover %s: switchover completed; removing the source copy", spec.migration_id)
        destroy_and_undefine(sdom)
    if not mig.keep_source_disks:
        used = {p for d in src.listAllDomains(0) for _, p, _, _ in domain_disks(d)}
        for _dev, path, _fmt, _el in domain_disks(tdom):
            if path not in used and delete_volume(src, path):
                log.info("recover %s: removed %s from %s", spec.migration_id, path, spec.source_host)
    return Recovered(spec.target_host, stats)


def _recovered_on_source(mig: LibvirtMigration, dst: Any, sdom: Any, tdom: Any) -> Recovered:
    """The source's copy is the droplet: no limit left, running (offline: shut off); target clean."""
    lv = libvirt_module()
    spec = mig.spec
    if spec.offline:
        if sdom.isActive():
            sdom.destroy()  # started paused for the copy: shut off again
    else:
        if not sdom.isActive():
            raise DriverError(f"{mig.domain_name} is shut off on {spec.source_host}; not resuming it")
        try:
            lift_source_limits(sdom, spec.migration_id)
        except DriverError as e:
            log.warning("recover %s: disk write limits not checked: %s", spec.migration_id, e)
        if sdom.state()[0] == lv.VIR_DOMAIN_PAUSED:
            sdom.resume()
    disks = mig.adopt_source_copy(sdom)
    if tdom is not None or any(volume_exists(dst, d.path) for d in disks):
        mig.remove_target_leftovers()
    return Recovered(spec.source_host, {})


def lift_source_limits(dom: Any, migration_id: str) -> None:
    """Put the source's disks back to their own I/O limits (a dead worker's write limit would stay)."""
    disks = read_disks(dom, sized=False)
    devices = BlockDevices()
    for block in qmp_list(dom, "query-block"):
        inserted = block.get("inserted") or {}
        for disk in disks:
            qdev = str(block.get("qdev", ""))
            if disk.alias and names_device(qdev, disk.alias):
                own = io_throttle_args(devices.qdev(dom, disk), disk, None)
                if (
                    int(inserted.get("bps_wr", 0)) != own["bps_wr"]
                    or int(inserted.get("bps", 0)) != own["bps"]
                ):
                    log.warning("recover %s: lifting a disk write limit on %s", migration_id, disk.target)
                    qmp(dom, "block_set_io_throttle", own)


def job_active(dom: Any) -> bool:
    """Whether ``dom`` has a job (a migration) running."""
    lv = libvirt_module()
    try:
        return bool(dom.jobInfo()[0] != lv.VIR_DOMAIN_JOB_NONE)
    except lv.libvirtError:
        return False


def wait_job_end(dom: Any) -> None:
    deadline = time.monotonic() + RECOVER_JOB_WAIT_S
    while job_active(dom):
        if time.monotonic() > deadline:
            raise DriverError(
                f"the orphaned migration job of {dom.name()} did not end within {RECOVER_JOB_WAIT_S:.0f} s"
            )
        time.sleep(RECOVER_POLL_S)


def completed_job_stats(tdom: Any) -> dict[str, object]:
    """The completed migration's own figures, from the target's completed-job record (empty if gone)."""
    lv = libvirt_module()
    try:
        raw = dict(tdom.jobStats(lv.VIR_DOMAIN_JOB_STATS_COMPLETED))
    except lv.libvirtError:
        return {}
    stats: dict[str, object] = {}
    if "downtime" in raw:
        stats["downtime_ms"] = float(raw["downtime"])
    # The target's record counts the memory stream only (disk_* are 0 there: the mirror ran on the source);
    # the mirror copied every disk block at least once, so the disks' sizes are added: a lower bound.
    memory = int(raw.get("memory_processed") or raw.get("data_processed") or 0)
    disks = 0
    for _dev, path, _fmt, _el in domain_disks(tdom):
        with contextlib.suppress(lv.libvirtError, DriverError):
            disks += disk_size(tdom, path)
    if memory or disks:
        stats["bytes_transferred"] = memory + disks
    if "time_elapsed" in raw:
        stats["duration_s"] = float(raw["time_elapsed"]) / 1000.0
    if "memory_iteration" in raw:
        stats["rounds"] = int(raw["memory_iteration"])
    return stats
