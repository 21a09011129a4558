"""The simulated datacenter kept in the store as rows, shared by every process (docs/host-engine.md, "The simulated datacenter")."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from host_engine import schema
from host_engine.attempt import MigrationRun, run_migration
from host_engine.controller import ControllerConfig, GiB
from host_engine.drivers.base import DomainState, MigrationSpec, Phase
from host_engine.drivers.sim import (
    DEFAULT_NIC_BPS,
    DEFAULT_WORKLOAD,
    WORKLOADS,
    SimClock,
    SimHypervisor,
    StoredWorld,
    load_world,
)
from host_engine.engine_steps import SimTickStep
from host_engine.executor import ExecutorConfig
from host_engine.models import Droplet, Host, NewMigration
from host_engine.states import MigrationState as S
from host_engine.store import Store

SPEED = 10.0  # simulated seconds per (fake) wall second


def spec(
    mid: str, droplet: str, source: str, target: str, memory: int = GiB, disk: int = 4 * GiB
) -> MigrationSpec:
    return MigrationSpec(mid, droplet, source, target, f"sim://{source}", f"sim://{target}", 1, memory, disk)


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    """Hosts a, b, c (declared simulated) and d1, d2 on a; SQLite, and PostgreSQL when it is there."""
    s = Store.open(db_url)
    for name in ("a", "b", "c"):
        s.add_host(Host(name, "nyc1", 64, 512 * GiB, 20_000 * GiB, hypervisor_uri=f"sim://{name}"))
    for i in (1, 2):
        s.add_droplet(Droplet(f"d{i}", "a", 1, GiB, 4 * GiB, addresses=(f"10.0.0.{i}",)))
    yield s
    s.close()


def notified(store: Store, droplet: str, source: str, target: str) -> str:
    now = store.clock()
    (m,) = store.create_migrations(
        [NewMigration(droplet, source, target, now, now, now + timedelta(hours=1))]
    )
    store.transition(m.id, S.NOTIFIED, notified_at=now)
    return m.id


class Ticker:
    """``host-engine run``'s sim step on a fake wall clock."""

    def __init__(self, store: Store, worker: str = "w1") -> None:
        self.wall = 0.0
        self.step = SimTickStep.open(
            store, ExecutorConfig(worker=worker, tick_s=0.5), speed=SPEED, monotonic=lambda: self.wall
        )

    def tick(self) -> None:
        self.wall += 1.0
        self.step.tick()

    def until(self, done: Callable[[], bool], ticks: int = 600) -> None:
        for _ in range(ticks):
            if done():
                return
            self.tick()
        raise AssertionError("did not happen in time")


def test_sim_store_a_droplet_added_after_the_world_exists_is_simulated_and_migrates(store: Store) -> None:
    run = Ticker(store)
    run.tick()
    store.add_droplet(Droplet("late", "a", 1, GiB, 4 * GiB, addresses=("10.0.0.9",)))
    world = run.step.world
    assert SimHypervisor(world).domain_state("a", "late") is DomainState.RUNNING
    assert world.droplets["late"].workload == WORKLOADS[DEFAULT_WORKLOAD]()
    mid = notified(store, "late", "a", "b")
    run.until(lambda: store.get_migration(mid).state is S.COMPLETED)
    assert store.get_migration(mid).attempt == 1
    fresh = load_world(store)
    assert fresh.droplets["late"].host == "b"
    assert fresh.hosts_holding("late") == ["b"]
    run.tick()
    assert sim_rows(store, schema.sim_migrations) == 0  # recorded by the store: nothing left to remember


def sim_rows(store: Store, table: sa.Table) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


def test_sim_store_a_failed_attempt_leaves_no_rows_behind(store: Store) -> None:
    world = StoredWorld.open(store)
    driver = SimHypervisor(world).migration(spec("m1.1", "d1", "a", "b"))
    driver.prepare_target()
    driver.start()
    world.advance(1.0)
    world.persist()
    assert sim_rows(store, schema.sim_migrations) == 1
    assert load_world(store).hosts_holding("d1") == ["a", "b"]
    driver.abort()
    driver.finalize(False)
    assert sim_rows(store, schema.sim_migrations) == 0
    assert sim_rows(store, schema.sim_images) == 1  # the source's, written to while the copy watched it
    assert load_world(store).hosts_holding("d1") == ["a"]


def test_sim_store_ticks_write_only_the_rows_that_changed_in_a_world_of_2000_droplets(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "big.db")
    with store.begin() as tx:
        for name in ("a", "b"):
            tx.add_host(
                Host(name, "nyc1", 10_000, 100_000 * GiB, 1_000_000 * GiB, hypervisor_uri=f"sim://{name}")
            )
        for i in range(2000):
            tx.add_droplet(Droplet(f"d{i}", "a", 1, GiB, 4 * GiB, addresses=(f"10.{i // 250}.{i % 250}.1",)))
        # Minutes to copy: still running after the ticks measured.
        tx.add_droplet(Droplet("big", "a", 2, 4 * GiB, 200 * GiB, addresses=("10.99.0.1",)))
    written: list[int] = []

    @sa.event.listens_for(store.engine, "before_cursor_execute")
    def count(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        if statement.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE")):
            written.append(len(repr(parameters)))

    run = Ticker(store)
    opened = sum(written)
    mid = notified(store, "big", "a", "b")
    per_tick = []
    for _ in range(5):
        written.clear()
        run.tick()
        per_tick.append(sum(written))
    assert store.get_migration(mid).state is S.RUNNING
    # The whole world (2,000 droplets with their images) is megabytes; a tick writes what moved: kilobytes.
    assert opened < 10_000
    assert max(per_tick) < 300_000, per_tick
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(schema.sim_droplets)).scalar() <= 1
        assert conn.execute(sa.select(sa.func.count()).select_from(schema.sim_images)).scalar() <= 2
    store.close()


def test_sim_store_a_completion_is_in_the_sim_rows_before_the_store_records_it(store: Store) -> None:
    run = Ticker(store)
    mid = notified(store, "d1", "a", "b")
    executor, world = run.step.executor, run.step.world
    # Drive the executor but never the step's own end-of-tick save: as if the process died right after the
    # executor's completion transaction.
    for _ in range(2000):
        if store.get_migration(mid).state is S.COMPLETED:
            break
        executor.tick()
        world.advance(0.5)
    assert store.get_migration(mid).state is S.COMPLETED
    fresh = load_world(store)  # what every other process sees
    assert fresh.droplets["d1"].host == "b"
    assert fresh.hosts_holding("d1") == ["b"]  # the source image went with the completion, not after it


def test_sim_store_switched_over_but_not_recorded_runs_on_the_target_and_recovery_completes(
    store: Store,
) -> None:
    world = StoredWorld.open(store)
    first = spec("m1.1", "d1", "a", "b")
    driver = SimHypervisor(world).migration(first)
    run = MigrationRun(driver, ControllerConfig(), SimClock(world))
    assert run.begin()
    while driver.progress().phase is not Phase.DONE:
        assert run.step() is None
        world.advance(0.5)
    world.persist()  # the worker dies here: no finalize, the store never heard of the switchover
    fresh = load_world(store)
    assert store.get_droplet("d1").host == "a"
    assert fresh.droplets["d1"].host == "b"  # the sim is the hypervisor: it runs on the target
    assert fresh.hosts_holding("d1") == ["a", "b"]
    assert SimHypervisor(StoredWorld.open(store)).recover(first) == "b"
    assert load_world(store).hosts_holding("d1") == ["b"]
    # The executor records the move (its completion transaction, stood in for here).
    with store.begin() as tx:
        tx.conn.execute(schema.droplets.update().where(schema.droplets.c.id == "d1").values(host="b"))
    # The switched-over row no longer redirects anything: a move back is judged by the store's host.
    again = StoredWorld.open(store)
    back = run_migration(
        SimHypervisor(again).migration(spec("m2.1", "d1", "b", "a")), ControllerConfig(), SimClock(again)
    )
    assert back.converged, back.reason
    after = load_world(store)
    assert after.droplets["d1"].host == "a"
    assert after.hosts_holding("d1") == ["a"]


def test_sim_store_never_overwrites_a_row_another_process_changed(store: Store) -> None:
    one, two = StoredWorld.open(store), StoredWorld.open(store)
    one.droplets["d1"].throttle_pct = 30
    two.droplets["d1"].throttle_pct = 10
    one.persist()
    two.persist()
    assert two.writes.conflicts == 1
    assert load_world(store).droplets["d1"].throttle_pct == 30
    assert two.droplets["d1"].throttle_pct == 30  # its copy was dropped and is read again


def test_sim_store_migrations_driven_by_two_processes_share_the_source_nic(store: Store) -> None:
    worlds = [StoredWorld.open(store), StoredWorld.open(store)]
    drivers = []
    for world, (mid, droplet, target) in zip(worlds, [("m1.1", "d1", "b"), ("m2.1", "d2", "c")], strict=True):
        driver = SimHypervisor(world).migration(spec(mid, droplet, "a", target))
        driver.prepare_target()
        driver.start()
        world.persist()
        drivers.append(driver)
    for world in worlds:
        world.refresh()
        world.advance(3.0)
    for driver in drivers:
        rate = driver.progress().transfer_rate_bps
        assert rate == pytest.approx(DEFAULT_NIC_BPS / 2, rel=0.1)
    alone = StoredWorld.open(store)
    assert alone.external_load == {"a": (2, 0), "b": (0, 1), "c": (0, 1)}


def test_sim_store_is_deterministic_from_its_seed(tmp_path: Path) -> None:
    def remaining(path: Path) -> list[int]:
        s = Store.open(path)
        s.add_host(Host("a", "nyc1", 64, 512 * GiB, 20_000 * GiB, hypervisor_uri="sim://a"))
        s.add_host(Host("b", "nyc1", 64, 512 * GiB, 20_000 * GiB, hypervisor_uri="sim://b"))
        s.add_droplet(Droplet("db", "a", 2, 4 * GiB, 32 * GiB, addresses=("10.0.0.1",)))
        world = StoredWorld.open(s, seed=5)
        world.set_workload("db", WORKLOADS["database"]())
        result = run_migration(
            SimHypervisor(world).migration(spec("m.1", "db", "a", "b", 4 * GiB, 32 * GiB)),
            ControllerConfig(),
            SimClock(world),
        )
        s.close()
        return [p.disk_remaining_bytes + p.memory_remaining_bytes for p in result.trace]

    assert remaining(tmp_path / "one.db") == remaining(tmp_path / "two.db")


class _Outage:
    """The engine's store with an outage switch: ``begin`` fails as an unreachable database does."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.down = False

    def begin(self, *, readonly: bool = False) -> Any:
        from host_engine.errors import StoreError

        if self.down:
            raise StoreError("store error: connection refused")
        return self._store.begin(readonly=readonly)


def test_sim_store_an_outage_is_logged_once_and_its_end_once(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    world = StoredWorld.open(store)
    outage = _Outage(store)
    world.store = outage  # type: ignore[assignment]
    world.set_workload("d1", WORKLOADS["database"]())  # a change to write
    caplog.set_level("INFO", logger="host_engine.drivers.sim.stored")
    outage.down = True
    for _ in range(5):  # five ticks of the outage
        world.persist()
    outage.down = False
    world.persist()
    world.persist()
    lines = [r.getMessage() for r in caplog.records]
    assert sum("not saved yet" in line for line in lines) == 1, lines
    assert sum("saved again" in line for line in lines) == 1, lines
    assert load_world(store).droplets["d1"].workload == WORKLOADS["database"]()  # nothing lost
    outage.down = True  # a new outage: logged again, once
    world.persist()
    world.persist()
    assert sum("not saved yet" in r.getMessage() for r in caplog.records) == 2


def test_sim_store_the_pre_rows_world_row_is_deleted_on_open(store: Store) -> None:
    with store.begin() as tx:
        tx.sim_put("world", {"seed": 0, "hosts": {}, "droplets": {"x": "megabytes of images"}})
        tx.sim_put("meta", {"seed": 7})
    world = StoredWorld.open(store)
    with store.begin(readonly=True) as tx:
        assert tx.sim_keys() == ["meta"]
    assert world.seed == 7
    StoredWorld.open(store)  # and again: nothing to delete, nothing fails
