"""The store, on SQLite and on a real PostgreSQL server (parametrized by the ``store`` fixture)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from host_engine import schema
from host_engine.errors import Conflict, IllegalTransition, NotFound, StaleClaim, StoreError
from host_engine.models import Migration, NewMigration
from host_engine.states import (
    ACTIVE_STATES,
    CANCELLABLE,
    HostState,
    LogKind,
    MigrationState,
    can_transition,
)
from host_engine.store import ClaimLimits, Store, create_db_engine, database_url, offline_event_id
from host_engine.workers import WorkerName, WorkerNameTaken
from tests import pg
from tests.unit.host_engine.conftest import GIB, T0, FakeClock, make_droplet, make_host

S = MigrationState


def _new(droplet: str = "d1", source: str = "hv1", target: str = "hv2", minutes: int = 30) -> NewMigration:
    nb = T0 + timedelta(minutes=minutes)
    return NewMigration(
        droplet_id=droplet,
        source_host=source,
        target_host=target,
        not_before=nb,
        notice_at=nb - timedelta(minutes=10),
        deadline=nb,
        reason="kernel update",
        requested_by="alice",
    )


@pytest.fixture
def populated(store: Store) -> Store:
    for name in ("hv1", "hv2", "hv3"):
        store.add_host(make_host(name))
    store.add_droplet(make_droplet("d1", "hv1", owner_tag="acme"))
    store.add_droplet(make_droplet("d2", "hv1"))
    return store


def test_store_schema_is_versioned(store: Store) -> None:
    assert store.schema_version() == schema.LATEST_VERSION
    # Opening again applies nothing and keeps the data.
    store.add_host(make_host("hv1"))
    again = Store.open(store.engine.url.render_as_string(hide_password=False))
    assert again.schema_version() == schema.LATEST_VERSION
    assert [h.name for h in again.list_hosts()] == ["hv1"]
    again.close()


def test_store_refuses_newer_schema(sqlite_store: Store) -> None:
    with sqlite_store.engine.begin() as conn:
        conn.execute(schema.schema_version.insert().values(version=99, applied_at=T0, description="future"))
    with pytest.raises(StoreError, match="newer"):
        Store.open(sqlite_store.engine.url.render_as_string(hide_password=False))


def test_store_hosts_and_droplets_round_trip(populated: Store, clock: FakeClock) -> None:
    h = populated.get_host("hv1")
    assert (h.vcpus, h.memory_bytes, h.state, h.created_at) == (32, 128 * GIB, HostState.ACTIVE, T0)
    d = populated.get_droplet("d1")
    assert d.host == "hv1" and d.owner_tag == "acme" and len(d.addresses) == 1
    assert [x.id for x in populated.list_droplets(host="hv1")] == ["d1", "d2"]
    clock.advance(60)
    h2 = populated.set_host_state("hv1", HostState.MAINTENANCE, reason="disk swap", by="alice")
    assert (h2.state, h2.state_reason, h2.state_changed_by) == (HostState.MAINTENANCE, "disk swap", "alice")
    assert h2.updated_at == T0 + timedelta(seconds=60)


def test_store_unknown_and_duplicate(populated: Store) -> None:
    with pytest.raises(NotFound, match="unknown host 'nope'"):
        populated.get_host("nope")
    with pytest.raises(NotFound):
        populated.add_droplet(make_droplet("d9", "nope"))
    with pytest.raises(Conflict, match="already exists"):
        populated.add_host(make_host("hv1"))
    with pytest.raises(Conflict, match="already exists"):
        populated.add_droplet(make_droplet("d1", "hv2"))
    with pytest.raises(NotFound):
        populated.get_migration("m-nope")


def test_store_create_migration_logs_and_blocks_second(populated: Store) -> None:
    [m] = populated.create_migrations([_new()])
    assert m.state is S.PLANNED and m.event_id == f"{m.id}-live" and m.attempt == 0
    assert m.not_before == T0 + timedelta(minutes=30)
    with pytest.raises(Conflict, match="already has migration"):
        populated.create_migrations([_new(target="hv3")])
    [entry] = populated.history("d1")
    assert (entry.kind, entry.to_state, entry.migration_id) == ("transition", S.PLANNED, m.id)


def test_store_create_migrations_is_all_or_nothing(populated: Store) -> None:
    with pytest.raises(Conflict):
        populated.create_migrations([_new("d1"), _new("d2", target="hv1")])  # second targets its own source
    assert populated.list_migrations() == []
    assert populated.history("d1") == []


def test_store_transition_follows_table_and_logs(populated: Store, clock: FakeClock) -> None:
    [m] = populated.create_migrations([_new()])
    clock.advance(1200)
    m = populated.transition(m.id, S.NOTIFIED, notified_at=clock())
    assert m.state is S.NOTIFIED and m.notified_at == clock()
    with pytest.raises(IllegalTransition):
        populated.transition(m.id, S.COMPLETED)
    assert populated.get_migration(m.id).state is S.NOTIFIED  # unchanged
    with pytest.raises(Conflict, match="expected planned"):
        populated.transition(m.id, S.CANCELLED, expect=S.PLANNED)
    m = populated.transition(m.id, S.CANCELLED, message="operator abort")
    assert m.finished_at == clock()
    log = populated.migration_log(m.id)
    assert [(e.from_state, e.to_state) for e in log] == [
        (None, S.PLANNED),
        (S.PLANNED, S.NOTIFIED),
        (S.NOTIFIED, S.CANCELLED),
    ]
    assert log[-1].message == "operator abort"
    # The droplet is free again.
    [m2] = populated.create_migrations([_new(target="hv3")])
    assert m2.id != m.id


def test_store_rejects_unknown_fields(populated: Store) -> None:
    [m] = populated.create_migrations([_new()])
    with pytest.raises(ValueError, match="not updatable"):
        populated.transition(m.id, S.NOTIFIED, state="completed")
    with pytest.raises(ValueError, match="not updatable"):
        populated.update_migration(m.id, droplet_id="d2")


def test_store_claim_and_complete_switches_host_atomically(populated: Store, clock: FakeClock) -> None:
    [m] = populated.create_migrations([_new()])
    populated.transition(m.id, S.NOTIFIED, notified_at=clock())
    assert populated.claim("w1", due_by=clock()) == []  # not due yet
    clock.advance(30 * 60)
    [c] = populated.claim("w1", due_by=clock())
    assert c.claimed_by == "w1" and c.claimed_at == clock()
    assert populated.claim("w2", due_by=clock()) == []  # held by w1
    with pytest.raises(StaleClaim):
        populated.transition(m.id, S.RUNNING, worker="w2")
    populated.transition(m.id, S.RUNNING, worker="w1", started_at=clock())
    done = populated.complete(m.id, worker="w1", stats={"downtime_ms": 42, "bytes": 123})
    assert done.state is S.COMPLETED and done.stats == {"downtime_ms": 42, "bytes": 123}
    assert done.claimed_by is None and done.finished_at == clock()
    assert populated.get_droplet("d1").host == "hv2"


def test_store_complete_rolls_back_host_switch_on_illegal_state(populated: Store) -> None:
    [m] = populated.create_migrations([_new()])
    with pytest.raises(IllegalTransition):
        populated.complete(m.id)  # planned -> completed is illegal
    assert populated.get_droplet("d1").host == "hv1"
    assert populated.get_migration(m.id).state is S.PLANNED


def test_store_expired_claim_can_be_taken_over(populated: Store, clock: FakeClock) -> None:
    [m] = populated.create_migrations([_new(minutes=0)])
    populated.transition(m.id, S.NOTIFIED, notified_at=clock())
    populated.claim("w1", due_by=clock(), lease_s=60)
    clock.advance(61)
    [c] = populated.claim("w2", due_by=clock(), lease_s=60)
    assert c.claimed_by == "w2"
    assert "lease of w1 expired" in populated.migration_log(m.id)[-1].message


def test_store_retry_and_offline_path(populated: Store, clock: FakeClock) -> None:
    [m] = populated.create_migrations([_new(minutes=0)])
    populated.transition(m.id, S.NOTIFIED, notified_at=clock())
    populated.transition(m.id, S.RUNNING, attempt=1)
    populated.transition(m.id, S.FAILED, last_error="target disk full")
    m = populated.transition(m.id, S.NOTIFIED, not_before=clock() + timedelta(minutes=5))
    assert m.event_id.endswith("-live") and m.last_error == "target disk full"
    populated.transition(m.id, S.RUNNING, attempt=2)
    populated.transition(m.id, S.FAILED)
    m = populated.transition(m.id, S.OFFLINE_REQUIRED, event_id=offline_event_id(m.id), offline=True)
    assert m.event_id == f"{m.id}-offline" and m.offline


def test_store_usage_counts_incoming_migrations(populated: Store) -> None:
    with populated.begin(readonly=True) as tx:
        before = tx.usage_by_host()
    assert before["hv1"].vcpus == 4 and before["hv1"].droplets == 2
    assert "hv2" not in before
    populated.create_migrations([_new()])
    with populated.begin(readonly=True) as tx:
        after = tx.usage_by_host()
        tags = tx.owner_tags_by_host()
    assert (
        after["hv2"].memory_bytes == 4 * GIB and after["hv1"].droplets == 2
    )  # still on hv1 until it completes
    assert tags == {"hv1": {"acme"}, "hv2": {"acme"}}


def test_store_sim_world_key_values(store: Store) -> None:
    # The sim driver uses tx.sim_* inside its own transactions.
    with store.begin() as tx:
        assert tx.sim_get("world") is None
        tx.sim_put("world", {"hosts": {"a": 1}})
        tx.sim_put("world/b", [1, 2])
    with store.begin() as tx:
        assert tx.sim_get("world", for_update=True) == {"hosts": {"a": 1}}
        tx.sim_put("world", {"hosts": {}})
        assert tx.sim_keys("world") == ["world", "world/b"]
        tx.sim_delete("world/b")
    with store.begin(readonly=True) as tx:
        assert tx.sim_get("world") == {"hosts": {}}
        assert tx.sim_keys() == ["world"]


@pytest.mark.postgres
def test_two_processes_writing_a_new_sim_key_at_once_both_succeed(
    pg_server: pg.PostgresServer, clock: FakeClock
) -> None:
    """CI saw a second ``run --driver sim`` exit on "duplicate key ... sim_world_pkey": both found no row
    and both inserted it. The later writer must wait for the first and replace (or keep) its value."""
    url = pg_server.new_database()
    first, second = Store.open(url, clock=clock), Store.open(url, clock=clock)
    errors: list[BaseException] = []

    def write_meanwhile() -> None:
        try:
            with second.begin() as tx:
                assert tx.sim_get("meta", for_update=True) is None  # not committed yet: invisible
                tx.sim_put("meta", {"seed": 2})  # blocks on the first's uncommitted row
                assert tx.sim_setdefault("other", {"seed": 2}) == {"seed": 1}
        except BaseException as e:  # reported below
            errors.append(e)

    try:
        with first.begin() as tx:
            tx.sim_put("meta", {"seed": 1})
            assert tx.sim_setdefault("other", {"seed": 1}) == {"seed": 1}
            writer = threading.Thread(target=write_meanwhile)
            writer.start()
            time.sleep(1.0)  # the second transaction reaches its write and waits on this one's row
        writer.join(timeout=30)
        assert not writer.is_alive() and errors == []
        with first.begin(readonly=True) as tx:
            assert tx.sim_get("meta") == {"seed": 2} and tx.sim_get("other") == {"seed": 1}
    finally:
        first.close()
        second.close()


def test_store_concurrent_claims_never_double(populated: Store) -> None:
    """Several threads (each its own connection) claim at once: every migration is claimed exactly once."""
    for i in range(8):
        populated.add_droplet(make_droplet(f"c{i}", "hv1"))
    news = [_new(f"c{i}", minutes=0) for i in range(8)]
    ms = populated.create_migrations(news)
    for m in ms:
        populated.transition(m.id, S.NOTIFIED)
    got: list[str] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        while True:
            claimed = populated.claim(name, due_by=T0 + timedelta(days=1))
            if not claimed:
                return
            with lock:
                got.extend(c.id for c in claimed)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(got) == sorted(m.id for m in ms)


def test_store_database_url_forms() -> None:
    assert database_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert database_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert database_url("/x/y.db") == "sqlite:////x/y.db"
    assert database_url("sqlite:///rel.db") == "sqlite:///rel.db"


def test_store_unreachable_database_is_one_line_error() -> None:
    with pytest.raises(StoreError, match="cannot open store"):
        Store.open("postgresql://nobody@127.0.0.1:1/none")


def test_store_one_active_migration_per_droplet_enforced_by_database(populated: Store) -> None:
    populated.create_migrations([_new()])
    with pytest.raises(sa.exc.IntegrityError), populated.engine.begin() as conn:
        conn.execute(
            schema.migrations.insert().values(
                id="m-dup",
                droplet_id="d1",
                source_host="hv1",
                target_host="hv3",
                state="planned",
                event_id="m-dup-live",
                not_before=T0,
                notice_at=T0,
                deadline=T0,
                stats={},
                created_at=T0,
                updated_at=T0,
            )
        )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(list(MigrationState)), max_size=12))
def test_store_transitions_follow_the_table_under_any_sequence(
    populated: Store, steps: list[MigrationState]
) -> None:
    """Random sequences of requested states: legal ones are written and logged, illegal ones raise and
    change nothing; the log replays to the final state."""
    with populated.begin() as tx:  # the fixture is shared by the examples: finish the previous one
        for old in tx.list_migrations(states=ACTIVE_STATES):
            if old.state not in CANCELLABLE:
                tx.transition(old.id, S.FAILED)
            tx.transition(old.id, S.CANCELLED)
    [m] = populated.create_migrations([_new(minutes=0)])
    state = S.PLANNED
    for to in steps:
        if can_transition(state, to):
            assert populated.transition(m.id, to).state is to
            state = to
            if to.is_terminal:
                break
        else:
            with pytest.raises(IllegalTransition):
                populated.transition(m.id, to)
            assert populated.get_migration(m.id).state is state
    log = populated.migration_log(m.id)
    assert log[-1].to_state is state
    assert all(can_transition(e.from_state, e.to_state) for e in log[1:] if e.from_state and e.to_state)


# ---- claims under the fleet's limits; worker names ---------------------------------------------------------


def _due(store: Store, droplet: str, source: str, target: str) -> str:
    [m] = store.create_migrations([_new(droplet, source, target, minutes=0)])
    store.transition(m.id, S.NOTIFIED)
    return m.id


def _claim(store: Store, mid: str, worker: str, limits: ClaimLimits) -> Migration | None:
    with store.begin() as tx:
        return tx.claim_start(mid, worker, offline=False, lease_s=60, limits=limits)


def test_store_claim_start_keeps_the_fleet_source_and_target_limits(populated: Store) -> None:
    populated.add_host(make_host("hv4"))
    for d in ("d3", "d4"):
        populated.add_droplet(make_droplet(d, "hv1"))
    populated.add_droplet(make_droplet("e1", "hv3"))
    limits = ClaimLimits(max_parallel=3, max_per_source=2, max_per_target=1)
    m1 = _due(populated, "d1", "hv1", "hv2")
    m2 = _due(populated, "d2", "hv1", "hv2")
    m3 = _due(populated, "d3", "hv1", "hv4")
    m4 = _due(populated, "d4", "hv1", "hv3")
    m5 = _due(populated, "e1", "hv3", "hv1")

    started = _claim(populated, m1, "w1", limits)
    assert started is not None and started.state is S.RUNNING and started.claimed_by == "w1"
    assert started.attempt == 1
    assert _claim(populated, m2, "w2", limits) is None  # hv2 already receives one
    assert _claim(populated, m3, "w2", limits) is not None
    assert _claim(populated, m4, "w2", limits) is None  # two already leave hv1
    with populated.begin(readonly=True) as tx:  # the candidates skip full sources and targets
        assert [m.id for m in tx.claim_candidates(lease_s=60, limits=limits, limit=10)] == [m5]
    assert _claim(populated, m5, "w3", limits) is not None
    with populated.begin(readonly=True) as tx:  # three run: the fleet is full
        assert tx.claim_candidates(lease_s=60, limits=limits, limit=10) == []
    assert populated.get_migration(m2).state is S.NOTIFIED  # refused claims wrote nothing
    assert [e.kind for e in populated.migration_log(m2)] == ["transition", "transition"]

    populated.complete(m1, worker="w1")
    assert _claim(populated, m2, "w2", limits) is not None  # room into hv2 again
    assert _claim(populated, m1, "w2", limits) is None  # completed: never claimed again


def test_store_concurrent_claims_from_many_stores_never_exceed_the_fleet_limit(
    populated: Store, db_url: str, clock: FakeClock
) -> None:
    """Eight workers, each its own store (its own connections), claim a backlog of twelve at once."""
    ids = []
    for i in range(12):
        populated.add_droplet(make_droplet(f"c{i}", "hv1"))
        ids.append(_due(populated, f"c{i}", "hv1", "hv2" if i % 2 else "hv3"))
    limits = ClaimLimits(max_parallel=3)
    started: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def worker(name: str) -> None:
        store = Store.open(db_url, clock=clock)
        try:
            barrier.wait()
            for mid in ids:
                with store.begin() as tx:
                    if tx.claim_start(mid, name, offline=False, lease_s=60, limits=limits) is not None:
                        with lock:
                            started.append(mid)
        finally:
            store.close()

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(started) == 3 and len(set(started)) == 3
    assert len(populated.list_migrations(states=[S.RUNNING])) == 3


def test_store_renew_claims_answers_the_claims_still_held(populated: Store, clock: FakeClock) -> None:
    m1 = _due(populated, "d1", "hv1", "hv2")
    m2 = _due(populated, "d2", "hv1", "hv3")
    for mid in (m1, m2):
        assert _claim(populated, mid, "w1", ClaimLimits()) is not None
    clock.advance(61)
    with populated.begin(readonly=True) as tx:
        assert {m.id for m in tx.orphans("w2", lease_s=60)} == {m1, m2}  # expired: another may take them
    [taken] = populated.claim("w2", states=(S.RUNNING,), lease_s=60, migration_id=m2)
    assert taken.claimed_by == "w2"
    with populated.begin() as tx:
        held = tx.renew_claims("w1", [m1, m2])
    assert set(held) == {m1} and held[m1].claimed_at == clock()
    with populated.begin(readonly=True) as tx:
        assert [m.id for m in tx.orphans("w2", lease_s=60)] == [m2]  # its own (after a restart)
        assert tx.orphans("w3", lease_s=60) == []  # both renewed just now


@pytest.mark.postgres
def test_store_leases_do_not_expire_within_a_lease_of_a_database_restart(
    pg_server: pg.PostgresServer,
) -> None:
    """With the database's clock, a claim older than the lease is expired only if the database has been up
    for a lease: after a restart nobody could renew meanwhile."""
    store = Store.open(pg_server.new_database())
    try:
        with store.begin() as tx:
            assert tx.db_clock
            up_s = (
                tx.now - tx.conn.execute(sa.text("SELECT pg_postmaster_start_time()")).scalar_one()
            ).total_seconds()
            assert tx.stale_before(up_s + 3600) is None
            cutoff = tx.stale_before(1.0)
            assert cutoff is not None and cutoff == tx.now - timedelta(seconds=1)
    finally:
        store.close()


def test_store_worker_name_is_held_by_one_process_at_a_time(db_url: str, clock: FakeClock) -> None:
    first, second = Store.open(db_url, clock=clock), Store.open(db_url, clock=clock)
    try:
        held = WorkerName(first, "hv-a").acquire()
        with pytest.raises(WorkerNameTaken, match=rf"'hv-a' is held by another live .*pid {os.getpid()} on "):
            WorkerName(second, "hv-a").acquire()
        other = WorkerName(second, "hv-b").acquire()  # another name is free
        held.release()
        again = WorkerName(second, "hv-a").acquire()
        again.release()
        other.release()
    finally:
        first.close()
        second.close()


def test_store_worker_name_of_a_killed_process_is_free_at_once(db_url: str, tmp_path: Path) -> None:
    store = Store.open(db_url)
    code = (
        "import sys, time\n"
        "from host_engine.store import Store\n"
        "from host_engine.workers import WorkerName\n"
        f"held = WorkerName(Store.open({db_url!r}), 'hv-a').acquire()\n"
        "print('held', flush=True)\n"
        "time.sleep(120)\n"
    )
    repo = Path(__file__).resolve().parents[3]
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=repo, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"held\n"
        with pytest.raises(WorkerNameTaken):
            WorkerName(store, "hv-a").acquire()
        proc.kill()
        proc.wait(10)
        deadline = time.monotonic() + 10
        while True:  # the database notices the session ended within moments; the kernel drops a flock at once
            try:
                WorkerName(store, "hv-a").acquire().release()
                break
            except WorkerNameTaken:
                assert time.monotonic() < deadline
                time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        store.close()


def test_store_database_that_never_answers_fails_in_seconds_not_minutes() -> None:
    """A PostgreSQL address that accepts connections and then says nothing (a hung server, a black hole on the
    way): the store gives up within its connect timeout and reports an outage, so loops retry and SIGTERM
    is not held up."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        store = Store(create_db_engine(database_url(f"postgresql://nobody@127.0.0.1:{port}/none")))
        failures: list[BaseException] = []

        def read() -> None:
            try:
                store.list_migrations()
            except BaseException as e:  # reported to the test below
                failures.append(e)

        reader = threading.Thread(target=read, daemon=True)  # a daemon: a hang must not hold the test run
        started = time.monotonic()
        reader.start()
        reader.join(60)
        took_s = time.monotonic() - started
        assert not reader.is_alive(), "the store waited on a silent server for a minute"
        store.close()
    assert took_s < 30
    assert len(failures) == 1 and isinstance(failures[0], StoreError)


def test_store_log_kinds_are_checked_on_write_and_tolerated_on_read(populated: Store) -> None:
    [m] = populated.create_migrations([_new()])
    populated.append_log(m.id, LogKind.WAIT, "waiting")
    with pytest.raises(ValueError, match="typo"):
        populated.append_log(m.id, "typo", "an unknown kind is refused")  # type: ignore[arg-type]
    with populated.engine.begin() as conn:  # a kind written by a newer engine
        conn.execute(
            schema.migration_log.insert().values(
                migration_id=m.id, droplet_id="d1", at=T0, kind="future_kind", message="?", data={}
            )
        )
    kinds = [e.kind for e in populated.migration_log(m.id)]
    assert kinds == [LogKind.TRANSITION, LogKind.WAIT, "future_kind"]
    assert isinstance(kinds[1], LogKind)
