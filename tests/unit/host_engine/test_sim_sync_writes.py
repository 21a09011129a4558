"""The sim's write-blocking disk mirror: what the libvirt driver does by default since ``e82d636``.

A guest write completes only once it is on both hosts, so the mirror never falls behind: the background copy
goes over the allocated disk once at the cap, the guest's writes cross the link at its own rate (counted in
the bytes), no dirty block is left for the pause, and the controller's disk write limit has nothing to do.
``[sim] sync_disk_writes = false`` (or option ``sync_writes=0``) keeps libvirt's background mirror.
"""

from __future__ import annotations

import pytest

from host_engine.attempt import MigrationResult, Outcome, run_migration
from host_engine.calibration import RecordedRun, calibrate
from host_engine.controller import ControllerConfig
from host_engine.drivers.base import MigrationSpec, Phase
from host_engine.drivers.sim import HostModel, MiB, SimClock, SimHypervisor, SimWorld, Workload
from host_engine.drivers.sim.settings import sim_settings

DISK = 28 * MiB  # the libvirt bench's disk-heavy guest: a 28 MiB disk, all of it written
MEMORY = 128 * MiB
CAP_MIBPS = 8
LINK_BPS = 150 * MiB
# Writes 20 MiB/s over a 20 MiB hot set: faster than the 8 MiB/s cap, so a background mirror never catches up
# without the controller's temporary disk write limit.
DISK_HEAVY = Workload(
    "disk heavy",
    disk_rate_bps=20 * MiB,
    disk_hot_bytes=20 * MiB,
    memory_rate_bps=0.5 * MiB,
    memory_hot_bytes=256 * 1024,
    memory_resident_bytes=1 * MiB,
    disk_allocated_bytes=DISK,
)


def migrate(
    *,
    sync: bool | None = None,
    option: str | None = None,
    cap_mibps: int = CAP_MIBPS,
    link_bps: float = LINK_BPS,
    workload: Workload = DISK_HEAVY,
) -> tuple[MigrationResult, SimWorld, list[int]]:
    """One disk-heavy migration under the engine's controller; returns the result, the world and the dirty
    disk blocks left at every step of the memory phase and the pause."""
    world = SimWorld(5)
    model = HostModel(setup_s=0.0, switchover_ms=0.0)
    world.default_host_model = model if sync is None else HostModel(0.0, 0.0, sync_disk_writes=sync)
    for h in ("src", "dst"):
        world.add_host(h, nic_bps=link_bps)
    world.add_droplet("g", "src", memory_bytes=MEMORY, disk_bytes=DISK, workload=workload)
    options = {"bandwidth_mibps": str(cap_mibps)} if cap_mibps else {}
    if option is not None:
        options["sync_writes"] = option
    spec = MigrationSpec("m", "g", "src", "dst", "sim://src", "sim://dst", 1, MEMORY, DISK, options=options)
    clock = SimClock(world)
    left_after_disk: list[int] = []
    step = world._step

    def watched_step(dt: float) -> None:
        step(dt)
        mig = world.migrations.get("m")
        if mig is not None and mig.phase in (Phase.MEMORY, Phase.SWITCHOVER):
            left_after_disk.append(len(mig.disk_pending))

    world._step = watched_step  # type: ignore[method-assign]

    def bound() -> str | None:
        return "timeout" if clock.now() > 60 else None

    result = run_migration(
        SimHypervisor(world).migration(spec), ControllerConfig(), clock, should_abort=bound
    )
    return result, world, left_after_disk


def test_a_disk_heavy_guest_converges_in_one_pass_at_the_cap_with_no_write_limit() -> None:
    result, world, left = migrate()  # the default: the write-blocking mirror, as the libvirt driver's
    assert result.outcome is Outcome.COMPLETED, result.reason
    assert world.migrations["m"].verified is True
    # 28 MiB at 8 MiB/s is 3.5 s; the real harness took 4.1-4.6 s with ~0.6 s of setup.
    assert 3.0 <= result.duration_s <= 5.0
    assert result.disk_limit_s == 0
    # No dirty block once the disk phase is over, so none in the pause.
    assert left and max(left) == 0
    assert result.downtime_ms is not None and result.downtime_ms < 50


def test_the_background_mirror_still_needs_the_disk_write_limit() -> None:
    result, world, _ = migrate(sync=False)
    assert result.outcome is Outcome.COMPLETED, result.reason
    assert world.migrations["m"].verified is True
    assert result.disk_limit_s > 0  # today's behaviour: the controller had to slow the guest's writes
    synced, _, _ = migrate(sync=True)
    assert synced.duration_s < result.duration_s


def test_the_guests_writes_cross_the_link_uncapped_and_count_in_the_bytes() -> None:
    result, world, _ = migrate()
    mig = world.migrations["m"]
    # The background copy moved the disk once (28 MiB); the guest's writes, 20 MiB/s over the ~3.5 s the
    # mirror ran, crossed too: far more than the cap alone would let through beside the copy.
    assert mig.disk_sent_bytes >= DISK + 40 * MiB
    assert result.bytes_transferred >= mig.disk_sent_bytes
    background, _, _ = migrate(sync=False)
    assert background.bytes_transferred < DISK + 20 * MiB


def test_the_guests_writes_share_the_link_with_the_copy() -> None:
    # Uncapped on a 40 MiB/s link, the guest's 20 MiB/s of writes leave the copy ~20 MiB/s: the 28 MiB take
    # ~1.4 s where a guest that writes nothing needs ~0.7 s.
    result, _, _ = migrate(cap_mibps=0, link_bps=40 * MiB)
    quiet = Workload(**{**DISK_HEAVY.__dict__, "disk_rate_bps": 0.0})
    alone, _, _ = migrate(cap_mibps=0, link_bps=40 * MiB, workload=quiet)
    assert result.outcome is Outcome.COMPLETED and alone.outcome is Outcome.COMPLETED
    assert result.duration_s >= alone.duration_s + 0.5


def test_the_migration_option_overrides_the_host_setting() -> None:
    off, _, _ = migrate(sync=True, option="0")
    assert off.disk_limit_s > 0
    on, _, _ = migrate(sync=False, option="1")
    assert on.disk_limit_s == 0


def test_a_bad_sync_writes_option_is_refused_in_one_line() -> None:
    result, world, _ = migrate(option="yes")
    assert result.outcome is not Outcome.COMPLETED
    assert result.reason == "options.sync_writes must be 0 or 1, not 'yes'"
    assert world.droplets["g"].host == "src"


def test_the_setting_is_read_from_sim_and_per_host() -> None:
    assert sim_settings(None).default_host.model.sync_disk_writes is True
    s = sim_settings({"sync_disk_writes": False, "hosts": {"hv2": {"sync_disk_writes": True}}})
    assert s.default_host.model.sync_disk_writes is False
    assert s.host("hv2").model.sync_disk_writes is True
    assert s.host("hv3").model.sync_disk_writes is False


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"sync_disk_writes": 1}, r"\[sim\] sync_disk_writes: expected true or false, got 1"),
        ({"sync_disk_writes": "no"}, r"\[sim\] sync_disk_writes: expected true or false, got 'no'"),
        (
            {"hosts": {"hv2": {"sync_disk_writes": "true"}}},
            r"\[sim.hosts.hv2\] sync_disk_writes: expected true or false, got 'true'",
        ),
    ],
)
def test_a_bad_sync_disk_writes_is_a_one_line_error(doc: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sim_settings(doc)


@pytest.mark.parametrize("rate_reported", [False, True])
def test_calibration_from_write_blocking_runs_takes_the_guests_writes_off_the_allocated_disk(
    rate_reported: bool,
) -> None:
    """A run recorded with the write-blocking mirror counts the guest's writes in the mirror's bytes: the
    calibration must not read them as allocated disk, or it predicts the writes twice. The libvirt driver
    reports no disk dirty rate then (since ``da9e56f``; before, the guest's write rate): the writes are told
    from QEMU's mirror length, which starts at the allocated disk and grows with each write."""
    world = SimWorld(5)
    world.default_host_model = HostModel(setup_s=0.0, switchover_ms=0.0)
    for h in ("src", "dst"):
        world.add_host(h, nic_bps=LINK_BPS)
    world.add_droplet("g", "src", memory_bytes=MEMORY, disk_bytes=4 * DISK, workload=DISK_HEAVY)
    spec = MigrationSpec(
        "m", "g", "src", "dst", "", "", 1, MEMORY, 4 * DISK, options={"bandwidth_mibps": str(CAP_MIBPS)}
    )
    clock = SimClock(world)
    samples: list[dict[str, object]] = []

    def watch(p: object) -> None:
        from dataclasses import asdict

        d = asdict(p)  # type: ignore[call-overload]
        d["phase"] = d["phase"].value
        d["t"] = clock.now()
        # As the libvirt driver reports: QEMU's mirror length (what it sent and what is left of its pass),
        # and the guest's write rate (blockStats) as the dirty rate only before da9e56f.
        d["disk_total_bytes"] = d["disk_processed_bytes"] + d["disk_remaining_bytes"]
        d["disk_dirty_rate_bps"] = DISK_HEAVY.disk_rate_bps if rate_reported else 0.0
        samples.append(d)

    result = run_migration(SimHypervisor(world).migration(spec), ControllerConfig(), clock, on_progress=watch)
    run = RecordedRun(
        droplet_id="g",
        memory_bytes=MEMORY,
        disk_bytes=4 * DISK,
        cap_mibps=CAP_MIBPS,
        converged=result.outcome is Outcome.COMPLETED,
        duration_s=result.duration_s,
        downtime_ms=result.downtime_ms,
        bytes_transferred=result.bytes_transferred,
        samples=tuple(samples),
    )
    assert float(samples[-1]["disk_processed_bytes"]) > 2 * DISK  # type: ignore[arg-type]
    cal = calibrate([run, run])
    assert cal.host.sync_disk_writes is True
    fitted = cal.workloads["g"]
    assert fitted.disk_allocated_bytes is not None and 0.5 * DISK <= fitted.disk_allocated_bytes <= 1.5 * DISK
    assert fitted.disk_rate_bps == pytest.approx(DISK_HEAVY.disk_rate_bps, rel=0.3)
    assert calibrate([run, run], sync_disk_writes=False).host.sync_disk_writes is False
