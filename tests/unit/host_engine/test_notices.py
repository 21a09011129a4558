"""Notices give the guest at least its promised notice from the moment it was actually told, whatever the
delays: the engine down past notice time, a slow or failing metadata server (hypothesis over random delays,
on SQLite and on a real PostgreSQL). The admin API is faked at the transport and moves the FakeClock while a
notice ``PUT`` is in flight, so "when the guest was told" is the moment the fake server applied it.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from host_engine.config import EngineConfig, EngineLoopConfig
from host_engine.engine import Engine
from host_engine.metadata.notices import NOTICE_LEASE_S, NoticeSender, ceil_second, send_ahead, window_for
from host_engine.metadata.reconcile import MetadataSync, default_client_factory
from host_engine.models import Migration, NewMigration
from host_engine.states import MigrationState
from host_engine.store import Store
from host_engine.timeparse import format_time
from tests import pg
from tests.unit.host_engine.conftest import T0, FakeClock, add_hosts_served_by, make_droplet
from tests.unit.host_engine.fake_admin import FakeAdmin, answering

S = MigrationState
URL = "http://127.0.0.1:8131"
_EVENT = re.compile(r".*/admin/v1/droplets/(?P<id>[^/]+)/maintenance$")


@dataclass
class SlowAdmin(FakeAdmin):
    """A metadata server whose event ``PUT``s take time: ``before`` seconds until it applies one (the guest
    can see it from then on), ``after`` more until the engine has the answer; the first ``fail`` PUTs never
    arrive (connection refused)."""

    clock: FakeClock = field(default_factory=FakeClock)
    delays: list[tuple[float, float]] = field(default_factory=list)
    fail: int = 0
    told: dict[str, datetime] = field(default_factory=dict)

    def _handle(self, request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        m = _EVENT.match(request.url or "")
        if request.method != "PUT" or m is None:
            return super()._handle(request)
        if self.fail:
            self.fail -= 1
            raise requests.ConnectionError("connection refused")
        before, after = self.delays.pop(0) if self.delays else (0.0, 0.0)
        self.clock.advance(before)
        answer = super()._handle(request)
        if answer[0] in (200, 201):
            self.told.setdefault(m.group("id"), self.clock())
        self.clock.advance(after)
        return answer


@dataclass
class Case:
    notice_s: int
    poll_s: float
    droplets: int
    first_tick_s: float  # relative to the notice time: the engine was down until then
    delays: list[tuple[float, float]]
    fail: int


cases = st.builds(
    Case,
    notice_s=st.integers(10, 1200),
    poll_s=st.sampled_from([0.5, 1.0, 5.0]),
    droplets=st.integers(1, 4),
    first_tick_s=st.floats(-10, 1800),
    delays=st.lists(st.tuples(st.floats(0, 40), st.floats(0, 40)), max_size=10),
    fail=st.integers(0, 3),
)


@contextmanager
def rig(url: str, clock: FakeClock, case: Case, tmp: Path) -> Iterator[tuple[Store, Engine, SlowAdmin]]:
    store = Store.open(url, clock=clock)
    admin = SlowAdmin(URL, clock=clock, delays=list(case.delays), fail=case.fail)
    try:
        add_hosts_served_by(store, {"hv1": URL, "hv2": URL}, tmp)
        for i in range(case.droplets):
            store.add_droplet(make_droplet(f"d{i}", "hv1", addresses=(f"10.0.0.{i + 1}",)))
        config = EngineConfig(engine=EngineLoopConfig(poll_interval_s=case.poll_s, worker="w1"))
        sync = MetadataSync(store, default_client_factory(attempts=1, sleep=lambda s: None))
        engine = Engine(store, config, sync, clock=clock, sleep=clock.sleep)
        with answering(admin):
            yield store, engine, admin
        engine.close()
        sync.close()
    finally:
        store.close()


def plan(store: Store, clock: FakeClock, case: Case) -> list[Migration]:
    notice = timedelta(seconds=case.notice_s)
    not_before = clock() + timedelta(seconds=60) + notice
    news = [
        NewMigration(
            f"d{i}", "hv1", "hv2", not_before, not_before - notice, not_before + timedelta(minutes=5)
        )
        for i in range(case.droplets)
    ]
    return store.create_migrations(news)


def check_full_notice(url: str, case: Case, tmp: Path) -> None:
    clock = FakeClock(T0)
    with rig(url, clock, case, tmp) as (store, engine, admin):
        planned = {m.droplet_id: m for m in plan(store, clock, case)}
        notice_at = next(iter(planned.values())).notice_at
        clock.now = notice_at + timedelta(seconds=case.first_tick_s)
        for _ in range(200):
            engine.tick()
            if all(m.state is S.NOTIFIED for m in store.list_migrations()):
                break
            clock.advance(case.poll_s)
        for droplet_id, before in planned.items():
            m = store.get_migration(before.id)
            assert m.state is S.NOTIFIED
            told = admin.told[droplet_id]  # the moment the guest could first see its event
            notice = timedelta(seconds=case.notice_s)
            assert m.notified_at is not None and m.notified_at >= told  # recorded after it was true
            assert m.not_before - told >= notice  # the promise, counted from when it was told
            assert m.not_before >= before.not_before  # never earlier than planned
            assert m.deadline - m.not_before == before.deadline - before.not_before
            assert m.not_before - m.notice_at == notice
            event = admin.event(droplet_id)
            assert event is not None and event["not_before"] == format_time(m.not_before)  # the guest sees it
            [line] = [e for e in store.migration_log(m.id) if e.to_state is S.NOTIFIED]
            assert line.data["told_at"] == format_time(m.notified_at)
            assert line.data["lead_s"] >= case.notice_s
            if m.not_before > before.not_before:
                assert "moved" in line.message


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases)
def test_notices_keep_the_full_notice_under_random_delays_sqlite(case: Case) -> None:
    with tempfile.TemporaryDirectory() as d:
        check_full_notice(str(Path(d) / "engine.db"), case, Path(d))


@pytest.mark.postgres
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases)
def test_notices_keep_the_full_notice_under_random_delays_postgres(
    pg_server: pg.PostgresServer, case: Case
) -> None:
    with tempfile.TemporaryDirectory() as d:
        check_full_notice(pg_server.new_database(), case, Path(d))


def test_notices_on_time_and_fast_keep_the_planned_window(clock: FakeClock, tmp_path: Path) -> None:
    """No delay: the window is exactly the plan's, one PUT per guest, and the guest had a little more notice."""
    case = Case(notice_s=600, poll_s=1.0, droplets=3, first_tick_s=-30, delays=[], fail=0)
    with rig(str(tmp_path / "engine.db"), clock, case, tmp_path) as (store, engine, admin):
        planned = {m.id: m for m in plan(store, clock, case)}
        clock.now = next(iter(planned.values())).notice_at - timedelta(seconds=30)
        for _ in range(60):
            engine.tick()
            clock.advance(1)
        for m in store.list_migrations():
            assert m.state is S.NOTIFIED and m.not_before == planned[m.id].not_before
            assert m.notified_at is not None
            lead = m.not_before - m.notified_at
            assert timedelta(minutes=10) < lead <= timedelta(minutes=10) + send_ahead(1.0)
        puts = [p for meth, p in admin.calls if meth == "PUT" and p.endswith("/maintenance")]
        assert len(puts) == 3


def test_notices_window_for_rounds_up_and_never_moves_earlier() -> None:
    m = Migration(
        id="m-1",
        droplet_id="d0",
        source_host="hv1",
        target_host="hv2",
        state=S.PLANNED,
        event_id="m-1-live",
        not_before=T0 + timedelta(minutes=10),
        notice_at=T0,
        deadline=T0 + timedelta(minutes=20),
    )
    assert window_for(m, T0 - timedelta(seconds=5)) == m.not_before
    late = T0 + timedelta(seconds=3, microseconds=1)
    assert window_for(m, late) == T0 + timedelta(minutes=10, seconds=4)
    assert ceil_second(T0) == T0
    zero = Migration(**{**m.__dict__, "notice_at": m.not_before})
    assert window_for(zero, late + timedelta(hours=1)) == m.not_before  # nothing promised, nothing kept


def test_notices_a_worker_that_died_mid_notice_is_taken_over_after_the_lease(
    clock: FakeClock, tmp_path: Path
) -> None:
    """A claim blocks the other workers (no second PUT) until its lease runs out; then one of them sends it."""
    case = Case(notice_s=600, poll_s=1.0, droplets=2, first_tick_s=0, delays=[], fail=0)
    with rig(str(tmp_path / "engine.db"), clock, case, tmp_path) as (store, engine, admin):
        plan(store, clock, case)
        clock.advance(60)
        dead = NoticeSender(store, engine.sync, "w-dead", poll_interval_s=1.0, clock=clock)
        claimed, _ = dead.claim()  # ... and the process dies before its PUTs
        assert len(claimed) == 2
        for _ in range(int(NOTICE_LEASE_S) - 1):
            assert engine.tick().notified == []
            clock.advance(1)
        assert not [c for c in admin.calls if c[0] == "PUT" and c[1].endswith("/maintenance")]
        clock.advance(2)
        sent = engine.tick().notified
        assert len(sent) == 2 and all(m.claimed_by is None for m in sent)
        for m in sent:  # late by the lease: the window moved so the guest still gets its 10 minutes
            assert m.notified_at is not None and m.not_before - m.notified_at >= timedelta(minutes=10)
