"""The engine loop: notices at the right time, late notices keep their length, cancels clear, restarts
reconcile, SIGTERM stops. The admin API is faked at the transport; the clock is a FakeClock."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest

from host_engine import planner
from host_engine.config import EngineConfig, EngineLoopConfig
from host_engine.engine import Engine
from host_engine.metadata.notices import DELIVERY_ALLOWANCE, send_ahead
from host_engine.metadata.reconcile import MetadataSync, default_client_factory
from host_engine.states import MigrationState
from host_engine.store import Store
from host_engine.timeparse import format_time
from tests import pg
from tests.unit.host_engine.conftest import (
    ADMIN_URL_A,
    ADMIN_URL_B,
    T0,
    FakeClock,
    add_hosts_served_by,
    make_droplet,
)
from tests.unit.host_engine.fake_admin import FakeAdmin

S = MigrationState


def populate(store: Store, tmp_path: Path) -> Store:
    """hv1 and hv2 served by server A, hv3 by server B; d0, d1, d2 on hv1, ``other`` on hv2."""
    add_hosts_served_by(store, {"hv1": ADMIN_URL_A, "hv2": ADMIN_URL_A, "hv3": ADMIN_URL_B}, tmp_path)
    for i in range(3):
        store.add_droplet(make_droplet(f"d{i}", "hv1", addresses=(f"10.0.0.{i + 1}",)))
    store.add_droplet(make_droplet("other", "hv2", addresses=("10.0.9.9",)))
    return store


@pytest.fixture
def world(sqlite_store: Store, tmp_path: Path) -> Store:
    return populate(sqlite_store, tmp_path)


def make_engine(store: Store, clock: FakeClock) -> Engine:
    sync = MetadataSync(store, default_client_factory(attempts=2, sleep=lambda s: None))
    return Engine(store, EngineConfig(), sync, clock=clock, sleep=clock.sleep)


def evacuate_hv1(store: Store, clock: FakeClock, *, start_s: float = 3600, notice_s: float = 600) -> None:
    req = planner.Request(
        start=clock() + timedelta(seconds=start_s),
        notice=timedelta(seconds=notice_s),
        limits=planner.Limits(10, 10, 10),
        requested_by="tester",
        unsafe_short_notice=True,
    )
    planner.evacuate(store, "hv1", req, EngineConfig())


def test_engine_notices_just_before_notice_time_keeping_the_plan(
    world: Store, clock: FakeClock, servers: tuple[FakeAdmin, FakeAdmin]
) -> None:
    a, b = servers
    evacuate_hv1(world, clock)
    engine = make_engine(world, clock)
    engine.tick()  # reconcile registers every droplet; no notice yet
    assert set(a.droplets) == {"d0", "d1", "d2", "other"} and b.droplets == {}
    assert all(a.event(d) is None for d in a.droplets)
    ahead = send_ahead(engine.config.engine.poll_interval_s)
    clock.advance(3000 - ahead.total_seconds() - 1)
    assert engine.tick().notified == []
    clock.advance(1)  # notice_at (start - 10 min) minus one tick and the delivery allowance
    notified = engine.tick().notified
    assert sorted(m.droplet_id for m in notified) == ["d0", "d1", "d2"]
    for m in notified:
        ev = a.event(m.droplet_id)
        assert ev is not None
        assert (ev["event"], ev["id"], ev["state"]) == ("live_migrate", m.event_id, "scheduled")
        # The plan's window is kept, and the guest has (a little more than) its 10 minutes.
        assert ev["not_before"] == (T0 + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        assert m.state is S.NOTIFIED and m.notified_at == clock()
        assert m.not_before - m.notified_at == timedelta(minutes=10) + ahead
    assert a.event("other") is None and b.droplets == {}
    assert engine.tick().notified == []  # sent once
    puts = [p for meth, p in a.calls if meth == "PUT" and p.endswith("/maintenance")]
    assert sorted(puts) == [f"/admin/v1/droplets/d{i}/maintenance" for i in range(3)]


def test_engine_late_notice_moves_window(
    world: Store, clock: FakeClock, servers: tuple[FakeAdmin, FakeAdmin]
) -> None:
    a, _ = servers
    evacuate_hv1(world, clock)
    engine = make_engine(world, clock)
    clock.advance(3600 + 300)  # the engine was down through notice time and the window
    [m, *_] = engine.tick().notified
    # Moved past the delivery allowance: the guest has its full notice from when it was told.
    assert m.notified_at == clock()
    assert m.not_before == clock() + timedelta(minutes=10) + DELIVERY_ALLOWANCE
    assert m.deadline - m.not_before == timedelta(0)  # the window keeps its length (evacuate: none)
    ev = a.event(m.droplet_id)
    assert ev is not None and ev["not_before"] == format_time(m.not_before)
    [line] = [e for e in world.migration_log(m.id) if e.to_state is S.NOTIFIED]
    assert "15m after its notice time; not_before moved" in line.message
    assert line.data["lead_s"] >= 600 and line.data["moved_s"] > 0


def test_engine_unreachable_server_retries_next_tick(
    world: Store, clock: FakeClock, servers: tuple[FakeAdmin, FakeAdmin]
) -> None:
    a, _ = servers
    evacuate_hv1(world, clock)
    engine = make_engine(world, clock)
    a.down = True
    clock.advance(3000)
    result = engine.tick()
    assert result.notified == [] and result.errors
    assert {m.state for m in world.list_migrations()} == {S.PLANNED}  # never "notified" without a notice
    a.down = False
    result = engine.tick()
    assert len(result.notified) == 3


def test_engine_clears_cancelled_events(
    world: Store, clock: FakeClock, servers: tuple[FakeAdmin, FakeAdmin]
) -> None:
    a, _ = servers
    evacuate_hv1(world, clock)
    engine = make_engine(world, clock)
    clock.advance(3000)
    engine.tick()
    planner.cancel(world, host="hv1", by="tester")
    a.down = True
    assert engine.tick().cleared == []  # server down: still pending
    a.down = False
    cleared = engine.tick().cleared
    assert len(cleared) == 3
    assert all(a.event(d) is None for d in ("d0", "d1", "d2"))
    assert all(m.event_cleared_at is not None for m in world.list_migrations())
    assert engine.tick().cleared == []


def test_engine_clear_leaves_a_newer_event_alone(
    world: Store, clock: FakeClock, servers: tuple[FakeAdmin, FakeAdmin]
) -> None:
    a, _ = servers
    evacuate_hv1(world, clock)
    engine = make_engine(world, clock)
    clock.advance(3000)
    engine.tick()
    [old] = world.list_migrations(droplet_id="d0")
    planner.cancel(world, migration_id=old.id)
    a.droplets["d0"]["event"]["id"] = "someone-elses"
    engine.tick()
    assert a.event("d0") is not None and a.event("d0")["id"] == "someone-elses"  # type: ignore[index]


def test_engine_restart_reconciles_a_server_that_lost_its_state(
    world: Store, clock: FakeClock, servers: tuple[FakeAdmin, FakeAdmin]
) -> None:
    a, b = servers
    evacuate_hv1(world, clock)
    engine = make_engine(world, clock)
    clock.advance(3000)
    engine.tick()
    want = {d: dict(a.event(d) or {}) for d in ("d0", "d1", "d2")}
    a.droplets.clear()  # the server lost everything
    b.droplets["d0"] = {
        "addresses": ["10.0.0.1"],
        "hostname": "d0",
        "region": "",
        "event": None,
    }  # stale copy
    b.droplets["stranger"] = {"addresses": ["10.7.7.7"], "hostname": "", "region": "", "event": None}
    engine2 = make_engine(world, clock)
    [ra, rb] = engine2.reconcile()
    assert sorted(ra.registered) == ["d0", "d1", "d2", "other"]
    assert sorted(ra.events_set) == ["d0", "d1", "d2"]
    assert rb.removed == ["d0"] and rb.unknown == ["stranger"]
    for d, ev in want.items():
        got = a.event(d)
        assert got is not None and (got["id"], got["not_before"]) == (ev["id"], ev["not_before"])
    # Converged: a second pass changes nothing.
    assert not any(r.changed for r in engine2.reconcile())


def test_engine_run_loop_sleeps_with_injected_clock(
    world: Store, clock: FakeClock, servers: tuple[FakeAdmin, FakeAdmin]
) -> None:
    evacuate_hv1(world, clock, start_s=900, notice_s=600)
    engine = make_engine(world, clock)
    ticks = engine.run(max_ticks=400)
    assert ticks == 400 and clock.slept_s == [1.0] * 399
    assert {m.state for m in world.list_migrations()} == {S.NOTIFIED}


def test_engine_sigterm_stops_after_the_tick(
    world: Store, clock: FakeClock, servers: tuple[FakeAdmin, FakeAdmin]
) -> None:
    engine = make_engine(world, clock)
    old_term = signal.getsignal(signal.SIGTERM)
    old_int = signal.getsignal(signal.SIGINT)

    class Killer:
        calls = 0

        def tick(self) -> None:
            Killer.calls += 1
            if Killer.calls == 3:
                os.kill(os.getpid(), signal.SIGTERM)

    engine.steps.append(Killer())
    try:
        engine.install_signal_handlers()
        ticks = engine.run(max_ticks=1000)
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)
    assert ticks == 3 and engine.stopping


def test_engine_completed_hook_moves_the_droplet_between_servers(
    world: Store, clock: FakeClock, servers: tuple[FakeAdmin, FakeAdmin]
) -> None:
    """What the executor calls after a switch: the target's server gets the droplet, the source's loses it."""
    a, b = servers
    evacuate_hv1(world, clock)
    engine = make_engine(world, clock)
    clock.advance(3000)
    engine.tick()
    for m in world.list_migrations():
        world.transition(m.id, S.RUNNING)
        done = world.complete(m.id)
        engine.sync.completed(done)
        target_server = b if done.target_host == "hv3" else a
        assert done.droplet_id in target_server.droplets
        assert target_server.event(done.droplet_id) is None
        if target_server is b:
            assert done.droplet_id not in a.droplets
    assert all(m.event_cleared_at is not None for m in world.list_migrations())


def test_engine_reconcile_refused_droplet_does_not_stop_the_others(
    world: Store, clock: FakeClock, servers: tuple[FakeAdmin, FakeAdmin]
) -> None:
    a, _ = servers
    a.droplets["squatter"] = {"addresses": ["10.0.0.1"], "hostname": "", "region": "", "event": None}
    [ra, _rb] = make_engine(world, clock).reconcile()
    assert ra.error is None
    assert [d for d, _ in ra.failed] == ["d0"] and "already belongs to droplet squatter" in ra.failed[0][1]
    assert sorted(ra.registered) == ["d1", "d2", "other"] and ra.unknown == ["squatter"]


@pytest.fixture
def pg_world(pg_server: pg.PostgresServer, clock: FakeClock, tmp_path: Path) -> str:
    """The world of these tests on a fresh PostgreSQL database; each worker opens its own Store on it."""
    url = pg_server.new_database()
    with Store.open(url, clock=clock) as store:
        populate(store, tmp_path)
    return url


@contextmanager
def workers(url: str, clock: FakeClock, n: int) -> Iterator[list[Engine]]:
    """``n`` engine workers, each with its own Store (its own connections) on one database."""
    stores = [Store.open(url, clock=clock) for _ in range(n)]
    engines = []
    for i, store in enumerate(stores):
        config = EngineConfig(engine=EngineLoopConfig(worker=f"w{i}"))
        sync = MetadataSync(store, default_client_factory(attempts=2, sleep=lambda s: None))
        engines.append(Engine(store, config, sync, clock=clock, sleep=clock.sleep, ack_every=timedelta(0)))
    try:
        yield engines
    finally:
        for e in engines:
            e.close()
            e.sync.close()
        for s in stores:
            s.close()


def list_requests(server: FakeAdmin) -> int:
    return server.calls.count(("GET", "/admin/v1/droplets"))


@pytest.mark.postgres
def test_engine_workers_on_postgres_one_elected_reconciles_reads_acks_and_clears(
    pg_world: str, clock: FakeClock, servers: tuple[FakeAdmin, FakeAdmin]
) -> None:
    a, b = servers
    with workers(pg_world, clock, 3) as engines:
        for e in engines:
            e.tick()
        # Start-up: one worker reconciled each server (one list each), the others left it alone.
        assert (list_requests(a), list_requests(b)) == (1, 1)
        assert [bool(e.reconcile_reports) for e in engines] == [True, False, False]
        evacuate_hv1(engines[2].store, clock)
        clock.advance(3000)
        for e in engines:
            e.tick()
        assert {m.state for m in engines[0].store.list_migrations()} == {S.NOTIFIED}
        a.calls.clear()
        a.guest_ack("d1", "ready")
        for _ in range(3):  # three rounds, every worker ticking in each
            acked = [m.droplet_id for e in engines for m in e.tick().acked]
            assert acked in ([], ["d1"])
        # One list per server per round, whatever the number of workers; never one request per droplet.
        assert list_requests(a) == 3
        assert [p for meth, p in a.calls if meth == "GET" and p != "/admin/v1/droplets"] == []
        assert (
            engines[1]
            .store.get_migration(
                next(m.id for m in engines[1].store.list_migrations() if m.droplet_id == "d1")
            )
            .ack
            == "ready"
        )

        # The elected worker stops: the next one to tick takes over, and reconciles at once.
        engines[0].close()
        a.droplets.clear()  # meanwhile the server lost its state
        engines[1].tick()
        assert sorted(d for d in a.droplets) == ["d0", "d1", "d2", "other"]
        assert all(a.event(d) is not None for d in ("d0", "d1", "d2"))
        a.calls.clear()
        for e in engines:
            e.tick()
        assert list_requests(a) == 1  # engine 0 asks again but w1 holds the chores now

        planner.cancel(engines[2].store, host="hv1", by="tester")
        a.calls.clear()
        for e in engines:
            e.tick()
        deletes = [p for meth, p in a.calls if meth == "DELETE"]
        assert sorted(deletes) == [f"/admin/v1/droplets/d{i}/maintenance" for i in range(3)]  # once each
