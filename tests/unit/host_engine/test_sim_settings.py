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


def test_stored_world_gives_a_droplet_the_granularity_sim_settings_give_its_host(
    tmp_path: Path, clock: FakeClock
) -> None:
    # [sim] memory_page_bytes / disk_block_bytes (a host's, or every host's) held for the forecast's private
    # world (SimWorld.add_droplet) but not for the stored world host-engine run drives, whose droplets kept
    # QEMU's granularity: the forecast and the run it predicts simulated different droplets.
    store = Store.open(tmp_path / "e.db", clock=clock)
    for h in ("hv1", "hv2"):
        store.add_host(make_host(h, hypervisor_uri=f"sim://{h}"))
    store.add_droplet(make_droplet("d1", "hv1"))
    store.add_droplet(make_droplet("d2", "hv2"))
    settings = sim_settings(
        {
            "memory_page_bytes": 1 << 20,
            "hosts": {"hv2": {"disk_block_bytes": 1 << 22, "memory_page_bytes": 8192}},
        }
    )
    world = StoredWorld.open(store)
    apply_settings(world, settings)
    d1, d2 = world.droplet("d1"), world.droplet("d2")
    assert d1.memory_page_bytes == 1 << 20
    assert (d2.memory_page_bytes, d2.disk_block_bytes) == (8192, 1 << 22)
    forecast = SimWorld(0)
    forecast.add_host("hv1")
    apply_settings(forecast, settings)
    twin = forecast.add_droplet("d1", "hv1", memory_bytes=d1.memory_bytes, disk_bytes=d1.disk_bytes)
    assert (twin.memory_page_bytes, twin.disk_block_bytes) == (d1.memory_page_bytes, d1.disk_block_bytes)
    store.close()
