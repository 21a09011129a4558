"""The driver follows from the host: a libvirt URI is only ever driven by libvirt, ``sim://`` hosts (and hosts
registered without a URI) by the simulator; a requested driver that would drive a host of the other kind is
refused in one line, before any notice goes out; ``run`` logs which driver drives which hosts."""

from __future__ import annotations

import logging

import pytest

from host_engine.config import EngineConfig
from host_engine.drivers.base import DomainState, DriverError, MigrationSpec
from host_engine.drivers.libvirt import LibvirtHypervisor
from host_engine.drivers.sim import SimHypervisor, StoredWorld
from host_engine.engine_steps import RoutingHypervisor, SimTickStep, executor_step, plan_drivers
from host_engine.errors import InvalidInput
from host_engine.executor import Executor
from host_engine.inventory import DriverKind, driver_kind, sync_host
from host_engine.store import Store
from tests.unit.host_engine.cli_run import invoke
from tests.unit.host_engine.conftest import FakeClock, make_host
from tests.unit.host_engine.fake_admin import FakeAdmin

LIBVIRT = {"hv1": "qemu+tls://hv1.example/system", "hv2": "qemu+tls://hv2.example/system"}


def set_uris(db: str, uris: dict[str, str]) -> None:
    store = Store.open(db)
    with store.begin() as tx:
        for name, uri in uris.items():
            tx.update_host(name, hypervisor_uri=uri)
    store.close()


@pytest.mark.parametrize(
    ("uri", "kind"),
    [
        ("qemu+tls://hv1/system", DriverKind.LIBVIRT),
        ("qemu+unix:///system?socket=/run/x", DriverKind.LIBVIRT),
        ("test:///default", DriverKind.LIBVIRT),
        ("sim://hv1", DriverKind.SIM),
        ("sim:", DriverKind.SIM),
        ("", None),
    ],
)
def test_sim_driver_kind_follows_from_the_uri(uri: str, kind: DriverKind | None) -> None:
    assert driver_kind(uri) is kind


def test_sim_drivers_plan_each_host_by_its_uri_and_refuse_a_driver_of_the_other_kind() -> None:
    hosts = [
        make_host("hv1", hypervisor_uri=LIBVIRT["hv1"]),
        make_host("lab1", hypervisor_uri="sim://lab1"),
        make_host("lab2"),
    ]
    plan = plan_drivers(hosts)
    assert (plan.libvirt, plan.sim) == (("hv1",), ("lab1", "lab2"))
    assert plan.describe() == "driver libvirt drives hv1; sim drives lab1, lab2 (no URI)"
    with pytest.raises(InvalidInput) as e:
        plan_drivers(hosts, "sim")
    assert str(e.value).startswith("--driver sim cannot drive hv1 (qemu+tls://hv1.example/system)")
    assert "\n" not in str(e.value)
    with pytest.raises(InvalidInput, match=r"cannot drive lab1 \(sim://lab1\): a host with a sim URI"):
        plan_drivers(hosts, "libvirt")
    assert plan_drivers(hosts[2:], "libvirt").libvirt == ("lab2",)  # no URI: whichever is asked for


def test_sim_drivers_run_without_driver_drives_libvirt_hosts_through_libvirt(
    db: str, caplog: pytest.LogCaptureFixture
) -> None:
    set_uris(db, LIBVIRT | {"hv3": "qemu+tls://hv3.example/system"})
    store = Store.open(db)
    with caplog.at_level(logging.INFO, logger="host_engine.engine_steps"):
        step = executor_step(store, EngineConfig())
    assert isinstance(step, Executor)
    assert isinstance(step.hypervisor, LibvirtHypervisor)
    assert "driver libvirt drives hv1, hv2, hv3" in caplog.text
    store.close()


def test_sim_drivers_run_refuses_a_driver_that_would_simulate_libvirt_hosts(
    db: str, clock: FakeClock, admin: FakeAdmin
) -> None:
    set_uris(db, LIBVIRT)
    invoke(db, clock, "evacuate", "hv1", "--start", "+1s", "--notice", "1s", "--unsafe-short-notice")
    r = invoke(db, clock, "run", "--driver", "sim", "--max-ticks", "1")
    assert r.exit_code == InvalidInput.exit_code, (r.output, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--driver sim cannot drive hv1 (qemu+tls://hv1.example/system)" in lines[0]
    assert admin.calls == []  # no notice went out


def test_sim_drivers_migrate_now_refuses_before_planning_or_notifying(
    db: str, clock: FakeClock, admin: FakeAdmin
) -> None:
    set_uris(db, LIBVIRT)
    r = invoke(
        db, clock, "migrate", "web1", "--to", "hv2", "--now", "--unsafe-short-notice", "--driver", "sim"
    )
    assert r.exit_code == InvalidInput.exit_code, (r.output, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1 and "driven only by libvirt" in r.stderr
    assert admin.calls == []
    assert Store.open(db).list_migrations() == []


def test_sim_drivers_a_mixed_fleet_routes_each_migration_to_its_hosts_driver(
    db: str, caplog: pytest.LogCaptureFixture
) -> None:
    set_uris(db, {"hv3": LIBVIRT["hv1"]})
    store = Store.open(db)
    with caplog.at_level(logging.INFO, logger="host_engine.engine_steps"):
        step = executor_step(store, EngineConfig())
    assert "driver libvirt drives hv3; sim drives hv1 (no URI), hv2 (no URI)" in caplog.text
    assert isinstance(step, SimTickStep)
    router = step.executor.hypervisor
    assert isinstance(router, RoutingHypervisor)
    assert set(step.world.hosts) == {"hv1", "hv2"}  # a libvirt host is never simulated
    assert router.domain_state("hv1", "web1") is DomainState.RUNNING
    across = MigrationSpec("m.1", "web1", "hv1", "hv3", "", LIBVIRT["hv1"], 1, 1, 1)
    with pytest.raises(DriverError, match="one driver must drive both hosts") as e:
        router.migration(across).prepare_target()
    assert e.value.target_at_fault  # the retry path looks for another target
    with pytest.raises(InvalidInput, match="--sim-speed"):
        executor_step(store, EngineConfig(), sim_speed=5)
    store.close()


def test_sim_drivers_the_simulator_never_prepares_a_migration_to_a_libvirt_host(db: str) -> None:
    set_uris(db, {"hv2": LIBVIRT["hv2"]})
    store = Store.open(db)
    world = StoredWorld.open(store)
    spec = MigrationSpec("m.1", "web1", "hv1", "hv2", "", LIBVIRT["hv2"], 1, 1, 1)
    with pytest.raises(DriverError, match="hv2"):
        SimHypervisor(world).migration(spec).prepare_target()
    assert world.hosts_holding("web1") == ["hv1"]
    store.close()


def test_sim_drivers_inventory_sync_of_a_simulated_host_is_one_clear_error(db: str) -> None:
    set_uris(db, {"hv1": "sim://hv1"})
    store = Store.open(db)
    with pytest.raises(InvalidInput, match=r"host hv1 is simulated \(sim://hv1\)"):
        sync_host(store, "hv1", lister=lambda uri: pytest.fail(f"asked a hypervisor at {uri}"))
    store.close()


def test_sim_drivers_recovery_of_a_droplet_gone_from_the_store_is_a_driver_error(db: str) -> None:
    store = Store.open(db)
    spec = MigrationSpec("m.1", "nobody", "hv1", "hv2", "", "", 1, 1, 1)
    with pytest.raises(DriverError, match="nobody"):
        SimHypervisor(StoredWorld.open(store)).recover(spec)  # the executor logs it and tries again later
    store.close()
