"""[sim] reaches the simulated datacenter that host-engine run and migrate --now drive."""

from __future__ import annotations

from pathlib import Path

from host_engine.drivers.sim import MiB, SimWorld
from host_engine.drivers.sim.settings import apply_settings, sim_settings
from host_engine.drivers.sim.stored import StoredWorld
from host_engine.store import Store
from tests.unit.host_engine.conftest import FakeClock, make_droplet, make_host

SETTINGS = {
    "link_mibps": 400,
    "setup_s": 1.0,
    "hosts": {"hv2": {"link_mibps": 50, "switchover_ms": 90}},
    "droplets": {"d1": {"workload": "database", "memory_rate_mibps": 12}},
}


def test_stored_world_takes_links_costs_and_workloads_from_sim_settings(
    tmp_path: Path, clock: FakeClock
) -> None:
    store = Store.open(tmp_path / "e.db", clock=clock)
    for h in ("hv1", "hv2"):
        store.add_host(make_host(h, hypervisor_uri=f"sim://{h}"))
    store.add_droplet(make_droplet("d1", "hv1"))
    store.add_droplet(make_droplet("d2", "hv1"))
    world = StoredWorld.open(store)
    # Before: every droplet the default workload, every host 10 Gbit/s.
    assert world.droplet("d1").workload.name == "web"
    assert world.host("hv2").nic_bps == 1_250_000_000
    world = StoredWorld.open(store)
    apply_settings(world, sim_settings(SETTINGS))
    assert world.host("hv1").nic_bps == 400 * MiB and world.host("hv2").nic_bps == 50 * MiB
    d1 = world.droplet("d1")
    assert d1.workload.name == "database" and d1.workload.memory_rate_bps == 12 * MiB
    assert world.droplet("d2").workload.name == "web"
    assert world.host_model("hv2").switchover_ms == 90 and world.host_model("hv2").setup_s == 1.0
    world.refresh()  # a later tick keeps them
    assert world.host("hv2").nic_bps == 50 * MiB
    store.close()


def test_in_memory_world_takes_sim_settings() -> None:
    world = SimWorld(1)
    world.add_host("hv1")
    world.add_host("hv2")
    apply_settings(world, sim_settings(SETTINGS))
    assert world.host("hv2").nic_bps == 50 * MiB
    assert world.host_model("hv1").setup_s == 1.0
