"""Each driver states, in every ``Progress``, the window its rates are averaged over (issue 16), so a policy
tuned on the sim can tell it sees 1 s rates there and 8 s averages from libvirt."""

from __future__ import annotations

import os

import pytest

from host_engine.drivers.base import MigrationSpec
from host_engine.drivers.sim import SimClock, SimHypervisor, SimWorld

MiB = 1024 * 1024


def test_sim_progress_states_its_one_second_rate_window() -> None:
    world = SimWorld(1)
    for host in ("src", "dst"):
        world.add_host(host)
    world.add_droplet("d1", "src", memory_bytes=64 * MiB, disk_bytes=256 * MiB)
    spec = MigrationSpec("m1", "d1", "src", "dst", "sim://src", "sim://dst", 1, 64 * MiB, 256 * MiB)
    driver = SimHypervisor(world).migration(spec)
    driver.prepare_target()
    driver.start()
    SimClock(world).sleep(5.0)  # past the fixed setup cost (2.7 s)
    progress = driver.progress()
    assert progress.transfer_rate_bps > 0
    assert progress.rate_window_s == 1.0


def test_libvirt_progress_states_its_eight_second_rate_window() -> None:
    if os.environ.get("CI") != "true":
        pytest.importorskip("libvirt", reason="libvirt-python is not installed")
    from host_engine.drivers.libvirt import RATE_WINDOW_S, LibvirtMigration

    spec = MigrationSpec("m1", "web1", "a", "b", "test:///default", "test:///default", 1, 64 * MiB, 0)
    progress = LibvirtMigration(spec).progress()  # before start: no connection is opened
    assert RATE_WINDOW_S == 8.0
    assert progress.rate_window_s == RATE_WINDOW_S
