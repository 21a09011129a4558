"""The disk mirror's own speed beside the link (``HostModel.mirror_bps``, ``[sim] mirror_mibps``) and how the
calibration finds both (``host_engine.calibration.link_and_mirror``).

On the harness memory moved at 1.2-1.3 GB/s (QEMU's measure, multifd) while samples a tick apart saw at most
250-290 MB/s, because the 128 MiB guests' copies end within a tick; the mirror (one NBD connection) is the
slower of the two. Calibrated on the floor alone the sim predicted the 48 MiB writer at +42 to +62 % bytes.
"""

from __future__ import annotations

from typing import Any

import pytest

from host_engine.attempt import Outcome, run_migration
from host_engine.calibration import Calibration, RecordedRun, link_and_mirror
from host_engine.cli.sim import as_toml
from host_engine.controller import ControllerConfig
from host_engine.drivers.base import MigrationSpec, Phase
from host_engine.drivers.libvirt.reporting import memory_rate
from host_engine.drivers.sim import HostModel, MiB, SimClock, SimHypervisor, SimWorld, Workload
from host_engine.drivers.sim.settings import sim_settings

DISK = 64 * MiB
MEMORY = 128 * MiB
LINK_BPS = 1000 * MiB
QUIET = Workload(
    "quiet",
    memory_rate_bps=0.0,
    memory_hot_bytes=4096,
    memory_resident_bytes=8 * MiB,
    disk_rate_bps=0.0,
    disk_hot_bytes=65536,
    disk_allocated_bytes=DISK,
)


def memory_from_s(mirror_bps: float | None) -> float:
    """When an uncapped migration of a quiet guest with 64 MiB of allocated disk reached memory."""
    world = SimWorld(3)
    world.default_host_model = HostModel(setup_s=0.0, switchover_ms=0.0, mirror_bps=mirror_bps)
    for h in ("src", "dst"):
        world.add_host(h, nic_bps=LINK_BPS)
    world.add_droplet("g", "src", memory_bytes=MEMORY, disk_bytes=DISK, workload=QUIET)
    spec = MigrationSpec("m", "g", "src", "dst", "sim://src", "sim://dst", 1, MEMORY, DISK)
    clock = SimClock(world)
    seen: list[float] = []

    def watch(p: Any) -> None:
        if p.phase is Phase.MEMORY and not seen:
            seen.append(clock.now())

    result = run_migration(
        SimHypervisor(world).migration(spec), ControllerConfig(), clock, tick_s=0.05, on_progress=watch
    )
    assert result.outcome is Outcome.COMPLETED, result.reason
    assert result.bytes_transferred >= DISK
    return seen[0] if seen else result.duration_s


def test_the_disk_mirror_copies_at_its_own_speed_and_memory_at_the_link() -> None:
    at_link = memory_from_s(None)  # 64 MiB at 1000 MiB/s: one 50 ms tick
    at_mirror = memory_from_s(100 * MiB)  # 64 MiB at 100 MiB/s: 0.64 s
    assert at_link <= 0.2  # seen at the first ticks after the setup
    assert 0.6 <= at_mirror <= 0.8


def test_mirror_mibps_is_read_from_sim_and_per_host_and_printed_by_calibrate() -> None:
    s = sim_settings({"mirror_mibps": 250, "hosts": {"hv2": {"mirror_mibps": 50.5}}})
    assert s.default_host.model.mirror_bps == 250 * MiB
    assert s.host("hv2").model.mirror_bps == 50.5 * MiB
    assert sim_settings(None).default_host.model.mirror_bps is None
    cal = Calibration(1200 * MiB, HostModel(mirror_bps=240 * MiB), {})
    toml = as_toml(cal)
    assert "link_mibps = 1200.0" in toml and "mirror_mibps = 240.0" in toml
    assert "mirror_mibps" not in as_toml(Calibration(1200 * MiB, HostModel(), {}))


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"mirror_mibps": 0}, r"\[sim\] mirror_mibps: must be within 0.001\.\.1.04858e\+06, got 0"),
        ({"mirror_mibps": -5}, r"\[sim\] mirror_mibps: must be within"),
        ({"mirror_mibps": "fast"}, r"\[sim\] mirror_mibps: expected a number, got 'fast'"),
        ({"mirror_mibps": True}, r"\[sim\] mirror_mibps: expected a number, got True"),
        ({"mirror_mibps": float("nan")}, r"\[sim\] mirror_mibps: must be within"),
        ({"hosts": {"hv2": {"mirror_mibps": 1e30}}}, r"\[sim.hosts.hv2\] mirror_mibps: must be within"),
    ],
)
def test_a_bad_mirror_mibps_is_a_one_line_error(doc: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sim_settings(doc)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_host_model_refuses_a_mirror_speed_that_is_not_a_positive_number(bad: float) -> None:
    with pytest.raises(ValueError, match="mirror_bps"):
        HostModel(mirror_bps=bad)


def _run(samples: list[dict[str, Any]], *, cap_mibps: int = 0) -> RecordedRun:
    return RecordedRun(
        droplet_id="g",
        memory_bytes=MEMORY,
        disk_bytes=DISK,
        cap_mibps=cap_mibps,
        converged=True,
        duration_s=2.4,
        downtime_ms=30.0,
        bytes_transferred=140 * MiB,
        samples=tuple(samples),
    )


def _samples(done_rate_bps: float) -> list[dict[str, Any]]:
    """What the harness's 48 MiB writer's uncapped run showed, a tick apart: the mirror's 64 MiB within one
    tick, then the memory copy over by the next sample; the done sample carries ``done_rate_bps``."""
    return [
        {"t": 0.28, "phase": "disk", "disk_processed_bytes": 0, "memory_processed_bytes": 0},
        {"t": 0.53, "phase": "disk", "disk_processed_bytes": DISK, "memory_processed_bytes": 0},
        {"t": 0.79, "phase": "memory", "disk_processed_bytes": DISK, "memory_processed_bytes": 70 * MiB},
        {
            "t": 2.4,
            "phase": "done",
            "disk_processed_bytes": DISK,
            "memory_processed_bytes": 79 * MiB,
            "transfer_rate_bps": done_rate_bps,
        },
    ]


def test_calibration_takes_the_link_from_qemus_measure_and_keeps_the_mirror_at_what_its_samples_saw() -> None:
    link, mirror = link_and_mirror([_run(_samples(1.3e9))])
    assert link == 1.3e9
    assert mirror == pytest.approx(DISK / 0.25)


def test_without_qemus_measure_the_link_is_the_sampled_floor_and_the_mirror_the_link() -> None:
    # Recordings before the driver reported QEMU's measure: the done sample's rate is the driver's own 8 s
    # average, below the floor; nothing changes for them.
    link, mirror = link_and_mirror([_run(_samples(74e6))])
    assert link == pytest.approx(70 * MiB / 0.26)
    assert mirror is None


def test_a_capped_runs_measure_is_not_the_link() -> None:
    link, mirror = link_and_mirror([_run(_samples(74e6)), _run(_samples(5e9), cap_mibps=32)])
    assert link == pytest.approx(70 * MiB / 0.26)
    assert mirror is None


@pytest.mark.parametrize(
    ("completed", "expected"),
    [
        ({"memory_bps": 1315151000}, 1315151000.0),
        ({}, 7.5),
        ({"memory_bps": 0}, 7.5),
        ({"memory_bps": "garbage"}, 7.5),
        ({"memory_bps": float("nan")}, 7.5),
        ({"memory_bps": -3}, 7.5),
    ],
)
def test_a_completed_jobs_rate_is_qemus_measure_when_libvirt_gives_one(
    completed: dict[str, Any], expected: float
) -> None:
    assert memory_rate(completed, 7.5) == expected


def _mirror_run(cap_mibps: int, span_s: float, written_mib: float) -> RecordedRun:
    """A write-blocking mirror's samples: 28 MiB allocated, ``written_mib`` of guest writes over ``span_s``."""
    allocated = 28 * MiB
    sent = allocated + written_mib * MiB
    return RecordedRun(
        droplet_id="disk heavy",
        memory_bytes=MEMORY,
        disk_bytes=allocated,
        cap_mibps=cap_mibps,
        converged=True,
        duration_s=2.4 + span_s,
        downtime_ms=25.0,
        bytes_transferred=int(sent),
        samples=(
            {"t": 0.3, "phase": "disk", "disk_total_bytes": allocated, "disk_processed_bytes": 0},
            {"t": 0.4, "phase": "disk", "disk_total_bytes": allocated, "disk_processed_bytes": 1 * MiB},
            {"t": 0.4 + span_s, "phase": "memory", "disk_total_bytes": sent, "disk_processed_bytes": sent},
            {"t": 2.5 + span_s, "phase": "done", "disk_total_bytes": sent, "disk_processed_bytes": sent},
        ),
    )


def test_the_guests_disk_write_rate_weighs_each_mirror_by_how_long_it_ran() -> None:
    """Recording 2's disk-heavy fold without rep 2 (2026-12-05): two capped runs (3.5 s of mirror, 17.5-17.8
    MiB/s) and two uncapped ones whose mirror was over within a tick (0.3-0.4 MiB/s read). The median of the
    four halved the guest's rate (8.9 MiB/s) and the sim sent 75 MiB where the run sent 95."""
    from host_engine.calibration import _sync_disk

    runs = [
        _mirror_run(0, 0.13, 0.05),
        _mirror_run(8, 3.47, 61.7),
        _mirror_run(0, 0.13, 0.05),
        _mirror_run(8, 3.70, 64.9),
    ]
    allocated, rate = _sync_disk(runs, 28 * MiB, 0.0)
    assert allocated == 28 * MiB
    assert rate == pytest.approx(126.7 * MiB / 7.45, rel=0.05)  # ~17 MiB/s
