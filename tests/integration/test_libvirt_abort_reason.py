"""When the controller aborts a real libvirt migration, the driver's failure says the controller's reason.

After ``abortJob`` libvirt's error says only what QEMU saw ("operation aborted: ... canceled by client", or
"operation failed: ... Input/output error" when the disk mirror was cut), never why the job was stopped: the
driver's warnings and the failure it reports carried that text alone. Now they say "aborted by the
controller: <reason>: <message> (libvirt: ...)".
Needs root, libvirtd, QEMU and binutils: skipped locally without them, failed under CI=true.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from tests.libvirt_harness import support
from tests.libvirt_harness.support import Conns, domain_names, run, running, spec_for, start_guest

pytestmark = pytest.mark.libvirt

hosts = support.hosts
conns = support.conns

DRIVER_LOGGER = "host_engine.drivers.libvirt"


def test_controller_abort_is_logged_and_reported_with_the_controllers_reason(
    hosts: Any, conns: Conns, caplog: pytest.LogCaptureFixture
) -> None:
    from host_engine.attempt import Outcome
    from host_engine.controller import AbortReason, ControllerConfig
    from host_engine.drivers.libvirt import LibvirtMigration
    from tests.libvirt_harness.guest import GuestSpec

    name = "abortwhy"
    sdom = start_guest(hosts, conns, name, GuestSpec(mem_kib=8 * 1024, disk_sectors=0, paced=True))
    # 128 MiB of RAM and the disk at 8 MiB/s take well over 4 s: the completion timeout fires mid-copy.
    cfg = ControllerConfig(timeout_floor_s=4.0, timeout_s_per_gib=0.0)
    driver = LibvirtMigration(spec_for(hosts, name, bandwidth_mibps="8"))
    with caplog.at_level(logging.INFO, logger=DRIVER_LOGGER):
        result = run(driver, cfg)
    assert result.outcome is Outcome.ABORTED, result.summary()
    assert result.abort_reason is AbortReason.TIMEOUT
    # The source runs untouched, the target holds nothing.
    assert running(sdom)
    assert name not in domain_names(conns.dst)

    driver_warnings = [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith(DRIVER_LOGGER) and r.levelno >= logging.WARNING
    ]
    print("\n" + "\n".join(driver_warnings))
    failed = [m for m in driver_warnings if ": failed: " in m]
    assert failed, driver_warnings
    assert all("aborted by the controller: timeout: completion timeout" in m for m in failed), failed
    migrate_failed = [m for m in driver_warnings if "migrateToURI3 failed" in m]
    assert migrate_failed and all("aborted by the controller: timeout" in m for m in migrate_failed)
    # libvirt's own text stays, after ours.
    assert all("(libvirt: " in m for m in failed + migrate_failed), failed + migrate_failed
    sdom.destroy()
    sdom.undefine()
