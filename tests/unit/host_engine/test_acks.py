"""The engine reads the guests' acknowledgements into the store: one list per metadata server per tick, only
for outstanding events, only the current event's ack, kept when a server forgets it; an unreachable server is
logged once and does not stop the others. The admin API is faked at the transport; the clock is a FakeClock.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

import pytest

from host_engine import planner
from host_engine.config import EngineConfig
from host_engine.engine import Engine
from host_engine.metadata.acks import ACK_READ_EVERY, GuestAck, ack_of
from host_engine.metadata.reconcile import MetadataSync, default_client_factory
from host_engine.models import Migration
from host_engine.states import MigrationState
from host_engine.store import Store
from tests.unit.host_engine.conftest import (
    ADMIN_URL_A,
    ADMIN_URL_B,
    FakeClock,
    add_hosts_served_by,
    make_droplet,
)
from tests.unit.host_engine.fake_admin import FakeAdmin

S = MigrationState


@pytest.fixture
def world(sqlite_store: Store, tmp_path: Path) -> Store:
    """hv1, hv2 on server A; hv3, hv4 on server B. d0, d1 on hv1; e0 on hv3."""
    add_hosts_served_by(
        sqlite_store,
        {"hv1": ADMIN_URL_A, "hv2": ADMIN_URL_A, "hv3": ADMIN_URL_B, "hv4": ADMIN_URL_B},
        tmp_path,
    )
    sqlite_store.add_droplet(make_droplet("d0", "hv1", addresses=("10.0.0.1",)))
    sqlite_store.add_droplet(make_droplet("d1", "hv1", addresses=("10.0.0.2",)))
    sqlite_store.add_droplet(make_droplet("e0", "hv3", addresses=("10.0.1.1",)))
    return sqlite_store


def make_engine(store: Store, clock: FakeClock, ack_every: timedelta = timedelta(0)) -> Engine:
    """An engine that reads the acks every tick (unless told otherwise)."""
    sync = MetadataSync(store, default_client_factory(attempts=2, sleep=lambda s: None))
    return Engine(store, EngineConfig(), sync, clock=clock, sleep=clock.sleep, ack_every=ack_every)


def evacuate(store: Store, clock: FakeClock, host: str) -> None:
    req = planner.Request(
        start=clock() + timedelta(seconds=3600),
        notice=timedelta(seconds=600),
        limits=planner.Limits(10, 10, 10),
        requested_by="tester",
        unsafe_short_notice=True,
    )
    planner.evacuate(store, host, req, EngineConfig())


def notified(store: Store, clock: FakeClock, engine: Engine, *hosts: str) -> dict[str, Migration]:
    for host in hosts:
        evacuate(store, clock, host)
    engine.tick()
    clock.advance(3000)
    engine.tick()
    ms = {m.droplet_id: m for m in store.list_migrations()}
    assert {m.state for m in ms.values()} == {S.NOTIFIED}
    return ms


def single_gets(server: FakeAdmin) -> list[str]:
    return [p for meth, p in server.calls if meth == "GET" and p.startswith("/admin/v1/droplets/")]


def lists(server: FakeAdmin) -> int:
    return server.calls.count(("GET", "/admin/v1/droplets"))


def ack_lines(store: Store, m: Migration) -> list[str]:
    return [e.message for e in store.migration_log(m.id) if e.kind == "ack"]


def test_acks_ready_is_recorded_once_with_a_log_line(
    world: Store, clock: FakeClock, servers: tuple[FakeAdmin, FakeAdmin]
) -> None:
    a, _ = servers
    engine = make_engine(world, clock)
    ms = notified(world, clock, engine, "hv1")
    a.guest_ack("d0", "ready")
    result = engine.tick()
    assert [m.droplet_id for m in result.acked] == ["d0"] and result.errors == []
    m = world.get_migration(ms["d0"].id)
    assert (m.ack, m.power_on_after, m.state) == ("ready", True, S.NOTIFIED)
    assert ack_lines(world, m) == ["guest acknowledged ready, power_on_after=true"]
    assert world.get_migration(ms["d1"].id).ack is None
    assert engine.tick().acked == []  # nothing new: no second line
    assert ack_lines(world, m) == ["guest acknowledged ready, power_on_after=true"]


def test_acks_offline_and_a_change_of_mind_record_power_on_after(
    world: Store, clock: FakeClock, servers: tuple[FakeAdmin, FakeAdmin]
) -> None:
    a, _ = servers
    engine = make_engine(world, clock)
    ms = notified(world, clock, engine, "hv1")
    a.guest_ack("d1", "ready")
    engine.tick()
    a.guest_ack("d1", "offline", power_on_after=False)
    assert [m.droplet_id for m in engine.tick().acked] == ["d1"]
    m = world.get_migration(ms["d1"].id)
    assert (m.ack, m.power_on_after) == ("offline", False)
    assert ack_lines(world, m) == [
        "guest acknowledged ready, power_on_after=true",
        "guest acknowledged offline, power_on_after=false",
    ]


def test_acks_are_kept_when_the_metadata_server_forgets_them(
    world: Store, clock: FakeClock, servers: tuple[FakeAdmin, FakeAdmin]
) -> None:
    a, _ = servers
    engine = make_engine(world, clock)
    ms = notified(world, clock, engine, "hv1")
    a.guest_ack("d0", "offline", power_on_after=False)
    engine.tick()
    a.droplets.clear()  # the server lost its disk, and the ack with it
    engine.reconcile()  # the engine puts the droplets and their events back (no ack: the guest's to give)
    assert a.droplets["d0"]["ack"] is None and a.event("d0") is not None
    assert engine.tick().acked == []
    m = world.get_migration(ms["d0"].id)
    assert (m.ack, m.power_on_after) == ("offline", False)


def test_acks_of_another_event_are_ignored(
    world: Store, clock: FakeClock, servers: tuple[FakeAdmin, FakeAdmin]
) -> None:
    a, _ = servers
    engine = make_engine(world, clock)
    ms = notified(world, clock, engine, "hv1")
    a.guest_ack("d0", "ready")
    a.droplets["d0"]["event"]["id"] = "someone-elses"
    assert engine.tick().acked == []
    assert world.get_migration(ms["d0"].id).ack is None
    assert ack_of({"event": {"id": "x"}, "ack": {"action": "nap"}}, "x") is None
    assert ack_of({"event": {"id": "x"}, "ack": {"action": "ready"}}, "x") == GuestAck("ready", True)
    assert ack_of(None, "x") is None


def test_acks_read_only_for_outstanding_events_one_list_per_server_per_tick(
    world: Store, clock: FakeClock, servers: tuple[FakeAdmin, FakeAdmin]
) -> None:
    a, b = servers
    engine = make_engine(world, clock)
    evacuate(world, clock, "hv1")
    evacuate(world, clock, "hv3")
    engine.tick()
    a.calls.clear()
    engine.tick()
    assert lists(a) == 0 and single_gets(a) == []  # planned: the guest has nothing to acknowledge
    clock.advance(3000)
    engine.tick()  # notices go out; the acks are read in the same tick
    a.calls.clear()
    b.calls.clear()
    for _ in range(3):
        engine.tick()
    # Two droplets outstanding on A, one on B: one list per server per tick, never one request per droplet.
    assert (lists(a), lists(b)) == (3, 3) and single_gets(a) == single_gets(b) == []
    for m in world.list_migrations():
        world.transition(m.id, S.CANCELLED)
    engine.tick()  # clears the cancelled events
    a.calls.clear()
    engine.tick()
    assert lists(a) == 0 and single_gets(a) == []  # no outstanding event: no more reads


def test_acks_unreachable_server_is_logged_once_and_the_others_are_still_read(
    world: Store,
    clock: FakeClock,
    servers: tuple[FakeAdmin, FakeAdmin],
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b = servers
    engine = make_engine(world, clock)
    ms = notified(world, clock, engine, "hv1", "hv3")
    a.down = True
    b.guest_ack("e0", "ready")
    a.calls.clear()
    with caplog.at_level(logging.WARNING, logger="host_engine.metadata.acks"):
        first = engine.tick()
        second = engine.tick()
    assert [m.droplet_id for m in first.acked] == ["e0"]
    assert world.get_migration(ms["e0"].id).ack == "ready"
    assert any("reading acks from " + ADMIN_URL_A in e for e in first.errors + second.errors)
    warnings = [r for r in caplog.records if r.name == "host_engine.metadata.acks"]
    assert len(warnings) == 1 and ADMIN_URL_A in warnings[0].getMessage()
    # One list tried per tick (2 attempts each): a dead server costs one timeout per tick.
    assert lists(a) == 2 * 2 and single_gets(a) == []
    a.down = False
    a.guest_ack("d0", "ready")
    assert [m.droplet_id for m in engine.tick().acked] == ["d0"]


def test_acks_are_read_every_few_seconds_by_default_not_every_tick(
    world: Store, clock: FakeClock, servers: tuple[FakeAdmin, FakeAdmin]
) -> None:
    a, _ = servers
    engine = make_engine(world, clock, ack_every=ACK_READ_EVERY)
    ms = notified(world, clock, engine, "hv1")
    a.calls.clear()
    a.guest_ack("d0", "ready")
    acked: list[str] = []
    for _ in range(10):  # ten one-second ticks: two reads at the default 5 s
        clock.advance(1)
        acked += [m.droplet_id for m in engine.tick().acked]
    assert lists(a) == 10 // int(ACK_READ_EVERY.total_seconds())
    assert acked == ["d0"] and world.get_migration(ms["d0"].id).ack == "ready"
