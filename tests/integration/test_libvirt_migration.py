"""Real live migrations between two real libvirt hosts on this machine (issue 7, "What must be shown").

One two-host harness (tests/libvirt_harness) serves the whole session; each test defines its own guest
(built from tests/libvirt_harness/guest.S) on the source host and drives ``LibvirtMigration`` through the
engine's executor and convergence controller, exactly as the engine does. Needs root, libvirtd, QEMU and
binutils: skipped locally without them, failed under CI=true.
"""

from __future__ import annotations

import contextlib
import dataclasses
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.libvirt_harness import support
from tests.libvirt_harness.engine_store import add_due_migration, harness_store
from tests.libvirt_harness.guest import BUSY_GUEST, NONCONVERGING_GUEST
from tests.libvirt_harness.support import (
    TICK_S,
    Conns,
    domain_names,
    images,
    qmp,
    run,
    running,
    spec_for,
    stable_xml,
    start_guest,
    wait_counter_advances,
    wait_for_phase,
    write_limits,
    write_limits_in_force,
)

pytestmark = pytest.mark.libvirt

# The session's one two-host harness and the test's connections to it (fixtures).
hosts = support.hosts
conns = support.conns

MiB = 1024 * 1024

# --- 1. a live migration completes; the guest runs on; the store shows the new host --------------------------


def test_live_migration_of_writing_guest_completes(hosts: Any, conns: Conns, tmp_path: Path) -> None:
    """The engine's own executor claims the migration from the store and drives the real hosts."""
    from host_engine.attempt import RealClock
    from host_engine.drivers.libvirt import LibvirtHypervisor
    from host_engine.executor import Executor, ExecutorConfig
    from host_engine.states import MigrationState
    from tests.libvirt_harness.guest import GuestSpec, read_counters

    name = "live1"
    guest = GuestSpec.at_rates(memory_dirty_bps=8 * MiB, disk_write_bps=1 * MiB)
    start_guest(hosts, conns, name, guest)

    with harness_store(tmp_path / "engine.db", hosts, name) as store:
        mid = add_due_migration(store, hosts, name)
        hv = LibvirtHypervisor(
            {h.name: h.uri for h in hosts.hosts}, peer_uris={h.name: h.peer_uri for h in hosts.hosts}
        )
        executor = Executor(store, hv, ExecutorConfig(worker="w1", tick_s=TICK_S), RealClock())
        t0 = time.monotonic()
        executor.run_until_idle(max_s=180)
        wall_s = time.monotonic() - t0
        done = store.get_migration(mid)
        print(f"\nlive migration: {wall_s:.2f} s wall, state {done.state.value}, stats {done.stats}")
        assert done.state is MigrationState.COMPLETED
        # The store shows the new host.
        assert store.get_droplet(name).host == hosts.target.name

    # The guest runs on the target: its counter keeps advancing there (memory and disk were moved live).
    tdom = conns.dst.lookupByName(name)
    assert running(tdom)
    before = read_counters(tdom)
    assert before.passes > 0
    wait_counter_advances(tdom)
    assert read_counters(tdom).sectors_written > before.sectors_written
    # The source holds nothing: no domain, no disk; the target's domain is persistent.
    assert name not in domain_names(conns.src)
    assert f"{name}.qcow2" not in images(hosts.source)
    assert tdom.isPersistent()
    assert hv.domain_state(hosts.target.name, name).value == "running"
    assert hv.domain_state(hosts.source.name, name).value == "absent"
    tdom.destroy()
    tdom.undefine()


# --- 2. switchover with the target paused: disks identical ----------------------------------------------------


def test_paused_switchover_leaves_identical_disks(hosts: Any, conns: Conns) -> None:
    from host_engine.attempt import Outcome
    from host_engine.drivers.libvirt import LibvirtMigration
    from tests.libvirt_harness.guest import GuestSpec, read_counters

    name = "paused2"
    guest = GuestSpec.at_rates(memory_dirty_bps=4 * MiB, disk_write_bps=2 * MiB)
    start_guest(hosts, conns, name, guest)
    spec = spec_for(hosts, name, paused="1", keep_source_disks="1")
    result = run(LibvirtMigration(spec))
    assert result.outcome is Outcome.COMPLETED, result.reason

    import libvirt

    tdom = conns.dst.lookupByName(name)
    assert tdom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
    assert read_counters(tdom).sectors_written > 0
    image = hosts.source.image_path(f"{name}.qcow2")
    compare = subprocess.run(
        ["qemu-img", "compare", "-U", str(hosts.source.path(image)), str(hosts.target.path(image))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert compare.returncode == 0, compare.stdout + compare.stderr
    assert "Images are identical" in compare.stdout
    tdom.resume()
    wait_counter_advances(tdom)
    tdom.destroy()
    tdom.undefine()
    hosts.source.path(image).unlink()


# --- 3a. a guest writing its disk faster than the cap converges because of the disk write limit ------------------

# FAST_DISK_WRITER (tests/libvirt_harness/guest.py) outruns its cap with libvirt's background mirror. With the
# controller's 1 MiB/s limit the blocks dirtied between two of the mirror's bursts fit in one burst (during
# which the TCG vCPU, waiting for QEMU's lock, writes nothing): in sync.


def test_fast_disk_writer_converges_with_the_controllers_write_limit(hosts: Any, conns: Conns) -> None:
    from host_engine.attempt import Outcome
    from host_engine.controller import AbortReason, ControllerConfig
    from host_engine.drivers.libvirt import LibvirtMigration
    from tests.libvirt_harness.guest import FAST_DISK_WRITER, FAST_DISK_WRITER_CAP_MIBPS

    name = "fastdisk3"
    src_dom = start_guest(hosts, conns, name, FAST_DISK_WRITER)
    xml_before = stable_xml(src_dom)

    # Without the write limit the mirror does not converge: the controller sees the stall and aborts, and
    # the source is left as it was.
    no_limit = ControllerConfig(disk_limit_enabled=False, stall_timeout_s=15.0)
    # Libvirt's background mirror (``[libvirt] sync_disk_writes = false``): the write-blocking mirror, the
    # default, never falls behind and needs no limit (tests/integration/test_libvirt_transport.py).
    background = {"bandwidth_mibps": FAST_DISK_WRITER_CAP_MIBPS, "sync_writes": "0"}
    result = run(LibvirtMigration(spec_for(hosts, name, **background)), no_limit)
    print(f"\nfast disk writer, no limit: {result.summary()}")
    if result.outcome is Outcome.COMPLETED:
        # TCG's write rate dips now and then and the mirror catches up: then it took long (the stall window
        # kept being reset) and the guest is moved back for the second half.
        assert result.duration_s >= no_limit.stall_timeout_s
        back = dataclasses.replace(
            spec_for(hosts, name),
            source_host=hosts.target.name,
            target_host=hosts.source.name,
            source_uri=hosts.target.uri,
            target_uri=hosts.source.uri,
            options={"peer_uri": hosts.source.peer_uri},
        )
        assert run(LibvirtMigration(back)).outcome is Outcome.COMPLETED
        src_dom = conns.src.lookupByName(name)
        xml_before = stable_xml(src_dom)
    else:
        assert result.outcome is Outcome.ABORTED
        assert result.abort_reason is AbortReason.STALLED
    assert running(src_dom)
    assert stable_xml(src_dom) == xml_before
    assert set(write_limits(src_dom).values()) == {0}
    assert name not in domain_names(conns.dst)
    assert f"{name}.qcow2" not in images(hosts.target)
    wait_counter_advances(src_dom)

    # With the controller's limit, applied on the running source (QEMU's query-block shows it), it converges.
    seen_on_source: list[int] = []

    def watch(p: Any) -> None:
        if p.disk_write_limit_bps is not None and p.phase.value in ("disk", "memory"):
            seen_on_source.extend(write_limits_in_force(src_dom))

    result = run(LibvirtMigration(spec_for(hosts, name, **background)), on_progress=watch)
    print(f"fast disk writer, controller's limit: {result.summary()}")
    assert result.outcome is Outcome.COMPLETED, result.reason
    # Issue 11: the record counts the mirrored disk, not just the memory stream libvirt's completed stats
    # may report alone (1.3 MiB recorded after 44.4 MiB sent, before the fix).
    assert result.bytes_transferred >= FAST_DISK_WRITER.disk_mib * MiB
    assert result.disk_limit_s > 0
    assert seen_on_source, "the write limit was never seen in force on the source"
    assert max(seen_on_source) <= 2 * MiB
    # The limit was the source's only: the target runs without it.
    tdom = conns.dst.lookupByName(name)
    assert set(write_limits(tdom).values()) == {0}
    wait_counter_advances(tdom)
    tdom.destroy()
    tdom.undefine()


# --- 3b + 5. a memory working set that cannot converge: detected, aborted, then moved offline -------------------


def test_nonconverging_memory_is_aborted_then_moved_offline(hosts: Any, conns: Conns) -> None:
    import libvirt

    from host_engine.attempt import Outcome
    from host_engine.controller import AbortReason, ControllerConfig
    from host_engine.drivers.libvirt import LibvirtMigration
    from tests.libvirt_harness.guest import read_counters

    name = "dirty48"
    # 48 MiB rewritten continuously (every page, 18 times a second) against a 32 MiB/s cap.
    src_dom = start_guest(hosts, conns, name, NONCONVERGING_GUEST)
    xml_before = stable_xml(src_dom)
    rounds: list[int] = []
    qemu_throttle: list[int] = []

    def watch(p: Any) -> None:
        rounds.append(p.round)
        with contextlib.suppress(libvirt.libvirtError, KeyError):
            qemu_throttle.append(int(qmp(src_dom, "query-migrate")["cpu-throttle-percentage"]))

    t0 = time.monotonic()
    result = run(
        LibvirtMigration(spec_for(hosts, name, bandwidth_mibps="32")), ControllerConfig(), on_progress=watch
    )
    took_s = time.monotonic() - t0
    throttled = [p.elapsed_s for p in result.trace if p.memory_throttle_pct > 0]
    throttled_s = (result.duration_s - throttled[0]) if throttled else 0.0
    print(
        f"\n48 MiB working set at 32 MiB/s: {took_s:.1f} s, throttled {throttled_s:.1f} s, {result.summary()}"
    )
    print(f"QEMU's CPU throttle seen: {sorted(set(qemu_throttle))}, rounds seen {sorted(set(rounds))}")
    # Issue 11.4: said from the rates, not by a stall timer (the default 30 s window never fires here)...
    assert result.outcome is Outcome.ABORTED
    assert result.abort_reason is AbortReason.NOT_CONVERGING, result.reason
    # ...within 2 memory rounds of QEMU's first dirty-rate sample (round 2), the cap's effect measured once
    # it was in force (QEMU applies a throttle at the second dirty sync after it is armed)...
    assert max(rounds) <= 2 + 2 + 1
    # ...having sent at most twice the guest's memory (its 64 MiB disk included), throttled for <= 10 s.
    assert result.bytes_transferred <= 2 * 128 * MiB
    assert throttled_s <= 10.0
    # QEMU applied the controller's level, never its own (20 % + 10 % a round up to 99 %).
    assert not qemu_throttle or max(qemu_throttle) <= ControllerConfig().throttle_max_pct
    # Source untouched: runs, same definition, no limit, no throttle left; the target holds nothing.
    assert running(src_dom)
    assert stable_xml(src_dom) == xml_before
    assert set(write_limits(src_dom).values()) == {0}
    assert src_dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE
    assert name not in domain_names(conns.dst)
    assert f"{name}.qcow2" not in images(hosts.target)
    wait_counter_advances(src_dom)

    # The offline path: the owner shuts the droplet down; its disk moves with the domain shut off, and it is
    # started on the target (power_on_after), booting afresh.
    src_dom.destroy()
    t0 = time.monotonic()
    result = run(LibvirtMigration(spec_for(hosts, name, offline=True, power_on_after=True)))
    print(f"offline migration: {time.monotonic() - t0:.2f} s, {result.summary()}")
    assert result.outcome is Outcome.COMPLETED, result.reason
    assert name not in domain_names(conns.src)
    assert f"{name}.qcow2" not in images(hosts.source)
    tdom = conns.dst.lookupByName(name)
    assert tdom.isPersistent()
    assert running(tdom)
    assert read_counters(tdom).passes < 10_000  # a fresh boot: the counters restarted
    wait_counter_advances(tdom)
    tdom.destroy()
    tdom.undefine()


def test_offline_migration_leaves_the_guest_shut_off_when_asked(hosts: Any, conns: Conns) -> None:
    from host_engine.attempt import Outcome
    from host_engine.drivers.libvirt import LibvirtMigration
    from tests.libvirt_harness.guest import GuestSpec, build_disk, domain_xml

    name = "off5"
    image = hosts.source.image_path(f"{name}.qcow2")
    guest = GuestSpec(mem_kib=1024, disk_sectors=64, paced=True)
    build_disk(guest, hosts.source.path(image))
    conns.src.defineXML(domain_xml(name, image, guest))
    spec = spec_for(hosts, name, offline=True, power_on_after=False, keep_source_disks="1")
    result = run(LibvirtMigration(spec))
    assert result.outcome is Outcome.COMPLETED, result.reason
    tdom = conns.dst.lookupByName(name)
    assert not tdom.isActive()
    assert tdom.isPersistent()
    assert name not in domain_names(conns.src)
    # The guest never ran: the target's disk holds exactly the source's data.
    compare = subprocess.run(
        ["qemu-img", "compare", str(hosts.source.path(image)), str(hosts.target.path(image))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert compare.returncode == 0, compare.stdout + compare.stderr
    tdom.undefine()
    hosts.source.path(image).unlink()
    hosts.target.path(image).unlink()


# --- 4. abort mid-migration; a target libvirtd killed mid-migration ------------------------------------------


def test_abort_mid_migration_leaves_the_source_untouched(hosts: Any, conns: Conns) -> None:
    import libvirt

    from host_engine.drivers.base import Phase
    from host_engine.drivers.libvirt import LibvirtMigration

    name = "abort4"
    src_dom = start_guest(hosts, conns, name, BUSY_GUEST)
    xml_before = stable_xml(src_dom)
    drv = LibvirtMigration(spec_for(hosts, name, bandwidth_mibps="8"))
    drv.prepare_target()
    drv.set_max_downtime(50)
    drv.start()
    wait_for_phase(drv, "memory")
    drv.set_disk_write_limit(2 * MiB)
    assert set(write_limits(src_dom).values()) == {2 * MiB}
    assert qmp(src_dom, "query-migrate-parameters")["downtime-limit"] == 50  # set before the job began
    assert f"{name}.qcow2" in images(hosts.target)
    assert name in domain_names(conns.dst)  # the incoming domain

    drv.abort()
    assert drv.progress().phase is Phase.FAILED
    drv.finalize(False)  # idempotent, as the executor calls both
    assert running(src_dom)
    assert stable_xml(src_dom) == xml_before
    assert set(write_limits(src_dom).values()) == {0}
    assert src_dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE
    wait_counter_advances(src_dom)
    assert name not in domain_names(conns.dst)
    assert f"{name}.qcow2" not in images(hosts.target)
    src_dom.destroy()
    src_dom.undefine()
    hosts.source.path(hosts.source.image_path(f"{name}.qcow2")).unlink()


def test_target_daemon_killed_mid_migration_then_cleaned_and_retried(hosts: Any, conns: Conns) -> None:
    from host_engine.attempt import Outcome
    from host_engine.drivers.base import DriverError, Phase
    from host_engine.drivers.libvirt import LibvirtMigration

    name = "kill4"
    src_dom = start_guest(hosts, conns, name, BUSY_GUEST)
    xml_before = stable_xml(src_dom)
    drv = LibvirtMigration(spec_for(hosts, name, bandwidth_mibps="8"))
    drv.prepare_target()
    drv.start()
    wait_for_phase(drv, "memory")
    hosts.target.kill_daemon()
    try:
        p = wait_for_phase(drv, "failed", timeout_s=90.0)
    except AssertionError:
        p = drv.progress()
    assert p.phase is Phase.FAILED, p
    print(f"\ntarget libvirtd killed: {p.error!r}, target_at_fault={p.target_at_fault}")
    assert p.target_at_fault
    with pytest.raises(DriverError) as failure:
        drv.finalize(False)  # the target cannot be cleaned while its daemon is down
    assert failure.value.target_at_fault
    # The source runs on, unchanged.
    assert running(src_dom)
    assert stable_xml(src_dom) == xml_before
    assert set(write_limits(src_dom).values()) == {0}
    wait_counter_advances(src_dom)
    assert f"{name}.qcow2" in images(hosts.target)  # the leftover disk

    # The harness restarts the daemon; the engine's next attempt removes the leftovers and succeeds.
    hosts.target.start()
    print(f"after the restart the target holds {domain_names(conns.dst)} and {images(hosts.target)}")
    # The retry's prepare_target removes the leftovers: creating the disk again would fail if the old file
    # were still there ("storage volume already exists").
    result = run(LibvirtMigration(spec_for(hosts, name)))
    assert result.outcome is Outcome.COMPLETED, result.reason
    tdom = conns.dst.lookupByName(name)
    assert running(tdom)
    wait_counter_advances(tdom)
    assert name not in domain_names(conns.src)
    tdom.destroy()
    tdom.undefine()
