"""The simulated datacenter kept in the store, where several processes see it (DESIGN.md §9)."""

from __future__ import annotations

from pathlib import Path

import pytest

from host_engine.attempt import MigrationRun
from host_engine.controller import ControllerConfig, GiB
from host_engine.drivers.base import MigrationSpec, Phase
from host_engine.drivers.sim import (
    SimClock,
    SimHypervisor,
    SimWorld,
    WorldConflict,
    load_world,
    save_world,
    web,
)
from host_engine.store import Store

SPEC = MigrationSpec("m1", "d1", "a", "b", "sim://a", "sim://b", 1, GiB, 4 * GiB)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.open(tmp_path / "engine.db")


def small_world() -> SimWorld:
    w = SimWorld(3)
    w.add_host("a")
    w.add_host("b")
    w.add_droplet("d1", "a", memory_bytes=GiB, disk_bytes=4 * GiB, workload=web())
    return w


def test_sim_store_world_survives_a_restart_mid_migration(store: Store) -> None:
    assert load_world(store) is None
    world = small_world()
    driver = SimHypervisor(world).migration(SPEC)
    driver.prepare_target()
    driver.start()
    world.advance(2.0)
    save_world(store, world)
    # Another process (or this one after a restart) picks the world up where it was.
    restored = load_world(store)
    assert restored is not None
    assert restored.to_json() == world.to_json()
    assert restored.migrations["m1"].phase is Phase.DISK
    # The job is still running in the restored world: keep driving it (no second prepare/start).
    run = MigrationRun(SimHypervisor(restored).migration(SPEC), ControllerConfig(), SimClock(restored))
    while (result := run.step()) is None:
        SimClock(restored).sleep(0.5)
    assert result.converged
    save_world(store, restored)
    again = load_world(store)
    assert again is not None
    assert again.droplets["d1"].host == "b"
    assert again.hosts_holding("d1") == ["b"]


def test_sim_store_refuses_to_overwrite_a_newer_world(store: Store) -> None:
    save_world(store, small_world())
    first, second = load_world(store), load_world(store)
    assert first is not None
    assert second is not None
    first.advance(1.0)
    save_world(store, first)
    second.advance(5.0)
    with pytest.raises(WorldConflict):
        save_world(store, second)
    kept = load_world(store)
    assert kept is not None
    assert kept.time_s == pytest.approx(1.0)
    save_world(store, kept)  # a fresh load saves fine
