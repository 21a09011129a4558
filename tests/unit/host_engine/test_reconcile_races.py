"""Reconciliation decides on the store's word at the moment it changes a server, not on the snapshot it took
at the start of its pass: other workers send notices and complete migrations while it runs (docs/host-engine.md, "Running several workers").
A notice in flight is not cleared; a droplet that moved mid-pass is neither registered back on its old
server nor removed from its new one. The admin API is faked at the transport; the race is staged by running
the other worker's step just before the server answers reconciliation's list.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path

import pytest
import requests

from host_engine.config import EngineConfig
from host_engine.engine import Engine
from host_engine.metadata.notices import NoticeSender
from host_engine.metadata.reconcile import MetadataSync, default_client_factory
from host_engine.models import Migration, NewMigration
from host_engine.states import MigrationState
from host_engine.store import Store
from tests.unit.host_engine.conftest import FakeClock, add_hosts_served_by, make_droplet
from tests.unit.host_engine.fake_admin import FakeAdmin, answering

S = MigrationState
URL_A = "http://127.0.0.1:8141"
URL_B = "http://127.0.0.1:8142"


@dataclass
class RacingAdmin(FakeAdmin):
    """Runs ``before_list`` (once) when a droplet list is asked for, before answering it."""

    before_list: list[Callable[[], None]] = field(default_factory=list)

    def _handle(self, request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        if (
            request.method == "GET"
            and (request.url or "").endswith("/admin/v1/droplets")
            and self.before_list
        ):
            self.before_list.pop(0)()
        return super()._handle(request)


@pytest.fixture
def servers() -> Iterator[tuple[RacingAdmin, RacingAdmin]]:
    a, b = RacingAdmin(URL_A), RacingAdmin(URL_B)
    with answering(a, b):
        yield a, b


@pytest.fixture
def world(sqlite_store: Store, tmp_path: Path) -> Store:
    """hv1, hv2 on server A; hv3 on server B; d0, d1 on hv1."""
    add_hosts_served_by(sqlite_store, {"hv1": URL_A, "hv2": URL_A, "hv3": URL_B}, tmp_path)
    sqlite_store.add_droplet(make_droplet("d0", "hv1", addresses=("10.0.0.1",)))
    sqlite_store.add_droplet(make_droplet("d1", "hv1", addresses=("10.0.0.2",)))
    return sqlite_store


def make_engine(store: Store, clock: FakeClock) -> Engine:
    sync = MetadataSync(store, default_client_factory(attempts=1, sleep=lambda s: None))
    return Engine(store, EngineConfig(), sync, clock=clock, sleep=clock.sleep)


def plan(store: Store, clock: FakeClock, droplet_id: str, target: str) -> str:
    not_before = clock() + timedelta(minutes=10)
    [m] = store.create_migrations(
        [NewMigration(droplet_id, "hv1", target, not_before, clock(), not_before + timedelta(minutes=5))]
    )
    return m.id


def test_reconcile_leaves_alone_an_event_another_worker_is_sending(
    world: Store, clock: FakeClock, servers: tuple[RacingAdmin, RacingAdmin]
) -> None:
    a, _ = servers
    engine = make_engine(world, clock)
    engine.reconcile()  # both droplets registered, no event
    mid = plan(world, clock, "d0", "hv2")
    other = NoticeSender(world, engine.sync, "w2", poll_interval_s=1.0, clock=clock)
    sending: list[Migration] = []

    def other_worker_sends_its_notice() -> None:
        # Claimed, PUT answered, the "notified" transition not written yet.
        [(m, droplet, host)], _ = other.claim()
        engine.sync.push(replace(m, state=S.NOTIFIED), droplet, host)
        sending.append(m)

    a.before_list.append(other_worker_sends_its_notice)
    [ra, _rb] = engine.reconcile()  # its snapshot (taken before the list) says: planned, no event wanted
    assert sending and ra.events_cleared == []
    event = a.event("d0")
    assert event is not None and event["id"] == world.get_migration(mid).event_id  # the guest keeps its flag
    [planned] = sending
    other.record(planned, planned)
    assert world.get_migration(mid).state is S.NOTIFIED
    assert not any(r.changed for r in engine.reconcile())


def test_reconcile_does_not_undo_a_move_completed_during_its_pass(
    world: Store, clock: FakeClock, servers: tuple[RacingAdmin, RacingAdmin]
) -> None:
    a, b = servers
    engine = make_engine(world, clock)
    engine.reconcile()
    mid = plan(world, clock, "d0", "hv3")
    world.transition(mid, S.NOTIFIED, notified_at=clock())
    engine.sync.notify(world.get_migration(mid))

    def executor_completes_the_move() -> None:
        world.transition(mid, S.RUNNING)
        engine.sync.completed(world.complete(mid))  # registered on B, removed from A

    a.before_list.append(executor_completes_the_move)  # while the pass (snapshot: d0 on hv1) is under way
    [ra, rb] = engine.reconcile()
    assert "d0" not in ra.registered and "d0" not in rb.removed
    assert "d0" not in a.droplets  # not registered back on the server it left
    assert "d0" in b.droplets and b.event("d0") is None  # still where it runs, with no event
    assert not any(r.changed for r in engine.reconcile())
