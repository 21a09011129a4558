"""The executor on SQLite with the sim driver: success, retries, the offline path, aborts, dead workers."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from host_engine.config import EngineConfig, EngineLoopConfig, PlacementConfig, config_from_dict
from host_engine.controller import GiB
from host_engine.drivers.base import DomainState, MigrationSpec, Phase, Recovered
from host_engine.drivers.sim import (
    Fault,
    FaultKind,
    HostModel,
    SimClock,
    SimHypervisor,
    SimWorld,
    Workload,
    database,
    diabolical,
    load_world,
    web,
)
from host_engine.engine_steps import SimTickStep, executor_step
from host_engine.errors import ConfigError, Conflict, InvalidInput, StoreError
from host_engine.executor import (
    ABORT_REQUEST_KEY,
    Executor,
    ExecutorConfig,
    attempt_id,
    placement_chooser,
    request_abort,
    timeline,
)
from host_engine.executor_metrics import ExecutorMetrics
from host_engine.models import Droplet, Host, Migration, NewMigration
from host_engine.retry import RetryConfig
from host_engine.states import MigrationState as S
from host_engine.store import (
    ClaimLimits,
    Store,
    create_db_engine,
    database_url,
    live_event_id,
    offline_event_id,
)
from tests.fake_drivers import StepClock
from tests.fleet import FileHypervisor

T0 = datetime(2026, 12, 1, 2, 0, tzinfo=UTC)
MEMORY = GiB
DISK = 8 * GiB


@dataclass
class Hooks:
    calls: list[tuple[str, str, str]] = field(default_factory=list)
    fail: bool = False

    def _record(self, name: str, m: Migration) -> None:
        self.calls.append((name, m.id, m.state.value))
        if self.fail:
            raise RuntimeError("metadata server down")

    def completed(self, m: Migration) -> None:
        self._record("completed", m)

    def retry_scheduled(self, m: Migration) -> None:
        self._record("retry_scheduled", m)

    def offline_required(self, m: Migration) -> None:
        self._record("offline_required", m)

    def cancelled(self, m: Migration) -> None:
        self._record("cancelled", m)


@dataclass
class Env:
    world: SimWorld
    store: Store
    clock: SimClock
    hooks: Hooks

    def executor(self, worker: str = "w1", **kw: object) -> Executor:
        choose = kw.pop("choose_target", None)
        config = ExecutorConfig(worker=worker, **kw)  # type: ignore[arg-type]
        return Executor(
            self.store,
            SimHypervisor(self.world),
            config,
            self.clock,
            hooks=self.hooks,
            choose_target=choose,  # type: ignore[arg-type]
            rand=lambda: 0.5,
        )

    def droplet(self, droplet_id: str, host: str = "a", workload: Workload | None = None) -> None:
        self.store.add_droplet(
            Droplet(droplet_id, host, 2, MEMORY, DISK, addresses=(f"10.0.0.{len(self.world.droplets) + 2}",))
        )
        self.world.add_droplet(
            droplet_id, host, memory_bytes=MEMORY, disk_bytes=DISK, workload=workload or web()
        )

    def migration(self, droplet_id: str, source: str = "a", target: str = "b", **kw: object) -> str:
        now = self.store.clock()
        (m,) = self.store.create_migrations(
            [NewMigration(droplet_id, source, target, now, now, now + timedelta(hours=1), **kw)]  # type: ignore[arg-type]
        )
        self.store.transition(m.id, S.NOTIFIED, notified_at=now)
        return m.id

    def state(self, mid: str) -> S:
        return self.store.get_migration(mid).state

    def drive(self, ex: Executor, until: Callable[[], bool], max_s: float = 4 * 3600) -> None:
        started = self.clock.now()
        while not until():
            assert self.clock.now() - started < max_s, "did not happen in time"
            ex.tick()
            self.clock.sleep(ex.config.tick_s if ex.active else 10.0)

    def assert_on_exactly(self, droplet_id: str, host: str) -> None:
        assert self.store.get_droplet(droplet_id).host == host
        assert self.world.droplets[droplet_id].host == host
        assert self.world.hosts_holding(droplet_id) == [host]
        d = self.world.droplets[droplet_id]
        assert d.throttle_pct == 0
        assert d.disk_limit_bps is None


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    world = SimWorld(11)
    store = Store.open(tmp_path / "engine.db", clock=lambda: T0 + timedelta(seconds=world.time_s))
    for name in ("a", "b", "c"):
        world.add_host(name)
        store.add_host(
            Host(
                name,
                "nyc1",
                32,
                128 * GiB,
                2000 * GiB,
                hypervisor_uri=f"sim://{name}",
                metadata_url="http://x/",
            )
        )
    yield Env(world, store, SimClock(world), Hooks())
    store.close()


def kinds(store: Store, mid: str) -> list[str]:
    return [e.kind for e in store.migration_log(mid)]


def test_executor_runs_a_due_migration_to_completion_and_records_it(env: Env) -> None:
    env.droplet("d1")
    mid = env.migration("d1")
    done = env.executor().run_until_idle()
    assert [(f.migration_id, f.state) for f in done] == [(mid, S.COMPLETED)]
    m = env.store.get_migration(mid)
    assert m.state is S.COMPLETED
    assert m.attempt == 1
    assert m.claimed_by is None
    last = m.stats["last_attempt"]
    assert last["outcome"] == "completed"
    assert 0 < last["downtime_ms"] <= 300
    assert last["bytes_transferred"] >= DISK + MEMORY
    assert m.stats["progress"]["phase"] == "done"
    env.assert_on_exactly("d1", "b")
    log = kinds(env.store, mid)
    assert "claim" in log
    assert log.count("progress") >= 3  # phase changes at least: disk, memory, switchover
    assert env.hooks.calls == [("completed", mid, "completed")]


def test_executor_does_not_start_before_not_before(env: Env) -> None:
    env.droplet("d1")
    now = env.store.clock()
    (m,) = env.store.create_migrations(
        [NewMigration("d1", "a", "b", now + timedelta(minutes=10), now, now + timedelta(hours=1))]
    )
    env.store.transition(m.id, S.NOTIFIED, notified_at=now)
    ex = env.executor()
    assert ex.tick() == []
    assert env.state(m.id) is S.NOTIFIED
    env.drive(ex, lambda: env.state(m.id) is S.COMPLETED)
    started = env.store.get_migration(m.id).started_at
    assert started is not None
    assert started >= now + timedelta(minutes=10)


def test_executor_target_crash_retries_on_another_target(env: Env) -> None:
    env.droplet("d1")
    mid = env.migration("d1")
    env.world.inject_fault(attempt_id(mid, 1), Fault(FaultKind.TARGET_CRASH, Phase.MEMORY))
    chosen: list[frozenset[str]] = []

    def choose(m: Migration, avoid: frozenset[str]) -> str | None:
        chosen.append(avoid)
        return next((h for h in ("a", "b", "c") if h not in avoid), None)

    ex = env.executor(choose_target=choose)
    first = ex.run_until_idle()
    assert [f.state for f in first] == [S.NOTIFIED]
    m = env.store.get_migration(mid)
    assert m.target_host == "c"
    assert m.event_id == live_event_id(mid)  # same event for the guest
    assert m.stats["failed_targets"] == ["b"]
    assert chosen == [frozenset({"a", "b"})]
    env.assert_on_exactly("d1", "a")
    env.drive(ex, lambda: env.state(mid) is S.COMPLETED)
    env.assert_on_exactly("d1", "c")
    assert [c[0] for c in env.hooks.calls] == ["retry_scheduled", "completed"]


def test_executor_source_errors_use_up_attempts_then_offline_migration_completes(env: Env) -> None:
    env.droplet("d1")
    mid = env.migration("d1", power_on_after=False)
    for attempt in (1, 2, 3):
        env.world.inject_fault(attempt_id(mid, attempt), Fault(FaultKind.SOURCE_ERROR, Phase.DISK, after_s=5))
    ex = env.executor()
    env.drive(ex, lambda: env.state(mid) is S.OFFLINE_REQUIRED)
    m = env.store.get_migration(mid)
    assert m.attempt == 3
    assert m.event_id == offline_event_id(mid)
    assert m.offline
    assert m.ack is None
    assert m.not_before >= env.store.clock() + timedelta(minutes=9)
    env.assert_on_exactly("d1", "a")
    # The guest has not shut down: the executor waits, it does not pull the plug.
    env.clock.sleep(700)
    ex.tick()
    assert env.state(mid) is S.OFFLINE_REQUIRED
    assert "wait" in kinds(env.store, mid)
    # The guest agent's before_offline hook shuts it down.
    env.world.droplets["d1"].state = DomainState.SHUT_OFF
    env.drive(ex, lambda: env.state(mid) is S.COMPLETED)
    env.assert_on_exactly("d1", "b")
    assert env.world.droplets["d1"].state is DomainState.SHUT_OFF  # power state as acknowledged
    assert env.store.get_migration(mid).stats["last_attempt"]["offline"] is True
    assert [c[0] for c in env.hooks.calls] == [
        "retry_scheduled",
        "retry_scheduled",
        "offline_required",
        "completed",
    ]


def test_executor_diabolical_guest_goes_offline_after_two_nonconverging_attempts(env: Env) -> None:
    env.droplet("d1", workload=diabolical(link_multiple=5))
    mid = env.migration("d1")
    ex = env.executor()
    env.drive(ex, lambda: env.state(mid) is S.OFFLINE_REQUIRED)
    m = env.store.get_migration(mid)
    assert m.attempt == 2
    assert m.stats["nonconverging_attempts"] == 2
    # Said from the rates (issue 11.4), before any stall timer.
    assert m.stats["last_attempt"]["abort_reason"] == "not_converging"
    env.assert_on_exactly("d1", "a")
    assert env.world.droplets["d1"].state is DomainState.RUNNING


def test_executor_guest_that_acknowledged_offline_gets_an_offline_copy(env: Env) -> None:
    env.droplet("d1")
    mid = env.migration("d1")
    env.store.update_migration(mid, ack="offline")
    env.world.droplets["d1"].state = DomainState.SHUT_OFF
    done = env.executor().run_until_idle()
    assert [f.state for f in done] == [S.COMPLETED]
    log = env.store.migration_log(mid)
    assert any(e.to_state is S.OFFLINE_RUNNING for e in log)
    assert env.world.droplets["d1"].state is DomainState.RUNNING  # power_on_after defaults to true
    env.assert_on_exactly("d1", "b")


def test_executor_operator_abort_stops_a_running_migration_source_untouched(env: Env) -> None:
    env.droplet("d1")
    mid = env.migration("d1")
    ex = env.executor()
    ex.tick()
    env.clock.sleep(2)
    ex.tick()
    assert env.state(mid) is S.RUNNING
    request_abort(env.store, mid, by="alice")
    assert env.store.get_migration(mid).stats[ABORT_REQUEST_KEY] == "alice"
    env.drive(ex, lambda: env.state(mid) is S.CANCELLED, max_s=30)
    env.assert_on_exactly("d1", "a")
    assert env.world.droplets["d1"].state is DomainState.RUNNING
    assert env.hooks.calls == [("cancelled", mid, "cancelled")]
    with pytest.raises(Conflict):
        request_abort(env.store, mid, by="alice")


def test_executor_abort_of_a_migration_not_yet_running_cancels_it(env: Env) -> None:
    env.droplet("d1")
    mid = env.migration("d1")
    assert request_abort(env.store, mid, by="bob").state is S.CANCELLED


def test_executor_dead_worker_mid_copy_is_recovered_by_another_after_its_lease(env: Env) -> None:
    env.droplet("d1")
    mid = env.migration("d1")
    dead = env.executor("w1")
    dead.tick()
    # Past the fixed costs (2.7 s), into the copy: QEMU's own switchover ends this droplet's copy within 20 s.
    env.clock.sleep(5)
    dead.tick()
    assert env.world.migrations[attempt_id(mid, 1)].phase in (Phase.DISK, Phase.MEMORY)
    del dead  # killed: no clean-up ran
    other = env.executor("w2")
    other.tick()
    assert env.state(mid) is S.RUNNING  # the lease has not expired yet: hands off
    env.clock.sleep(301)
    env.drive(other, lambda: env.state(mid) is S.COMPLETED)
    m = env.store.get_migration(mid)
    # Nobody watched the orphaned job for 5 minutes, and (like libvirt's peer-to-peer job) it carried on: QEMU
    # switched over by itself once the rest fitted its downtime limit, so recovery adopts the completed job
    # instead of retrying it.
    assert m.attempt == 1
    env.assert_on_exactly("d1", "b")


def test_executor_dead_worker_after_switchover_is_completed_by_recovery(env: Env) -> None:
    env.droplet("d1")
    mid = env.migration("d1")
    dead = env.executor("w1")
    dead.tick()
    while True:
        env.clock.sleep(0.5)
        if env.world.migrations[attempt_id(mid, 1)].phase is Phase.DONE:
            break
        dead.tick()
    del dead  # the droplet runs on b, the store still says a
    assert env.store.get_droplet("d1").host == "a"
    assert env.world.droplets["d1"].host == "b"
    restarted = env.executor("w1")  # same worker id after a restart: no need to wait for the lease
    done = restarted.tick()
    assert [(f.migration_id, f.state) for f in done] == [(mid, S.COMPLETED)]
    env.assert_on_exactly("d1", "b")


def test_executor_shutdown_aborts_and_hands_over_to_retry(env: Env) -> None:
    env.droplet("d1")
    mid = env.migration("d1")
    ex = env.executor()
    ex.tick()
    env.clock.sleep(5)
    ex.tick()
    done = ex.shutdown()
    assert [f.state for f in done] == [S.NOTIFIED]
    env.assert_on_exactly("d1", "a")
    assert env.store.get_migration(mid).claimed_by is None


def test_executor_hook_failure_does_not_undo_the_store(env: Env) -> None:
    env.hooks.fail = True
    env.droplet("d1")
    mid = env.migration("d1")
    env.executor().run_until_idle()
    assert env.state(mid) is S.COMPLETED
    assert env.hooks.calls == [("completed", mid, "completed")]


def test_executor_two_workers_share_the_queue_and_run_each_migration_once(env: Env) -> None:
    mids = []
    for i in range(6):
        env.droplet(f"d{i}")
        mids.append(env.migration(f"d{i}", target="b" if i % 2 else "c"))
    workers = [env.executor("w1", max_concurrent=2), env.executor("w2", max_concurrent=2)]

    def all_done() -> bool:
        return all(env.state(m) is S.COMPLETED for m in mids)

    started = env.clock.now()
    while not all_done():
        assert env.clock.now() - started < 3600
        for w in workers:
            w.tick()
            assert len(w.active) <= 2
        env.clock.sleep(0.5)
    for mid in mids:
        starts = [e for e in env.store.migration_log(mid) if e.to_state is S.RUNNING]
        assert len(starts) == 1
    by_worker = {
        e.message.rsplit(" ", 1)[-1]
        for m in mids
        for e in env.store.migration_log(m)
        if e.to_state is S.RUNNING
    }
    assert by_worker == {"w1", "w2"}


def test_executor_two_workers_keep_the_fleet_limits_whatever_each_could_run(env: Env) -> None:
    """Each worker could run 4; [concurrency] allows 2 fleet-wide and 1 into one target: checked in the store
    at claim time, so the two together never run more."""
    mids = []
    for i in range(6):
        env.droplet(f"d{i}")
        mids.append(env.migration(f"d{i}", target="b" if i % 2 else "c"))
    limits = ClaimLimits(max_parallel=2, max_per_source=2, max_per_target=1)
    workers = [env.executor(w, max_concurrent=4, limits=limits) for w in ("w1", "w2")]
    peak = 0
    started = env.clock.now()
    while not all(env.state(m) is S.COMPLETED for m in mids):
        assert env.clock.now() - started < 3600
        for w in workers:
            w.tick()
            running = env.store.list_migrations(states=[S.RUNNING])
            assert len(running) <= 2
            assert len({m.target_host for m in running}) == len(running)  # one per target
            peak = max(peak, len(running))
        env.clock.sleep(0.5)
    assert peak == 2


def test_executor_metrics_answer_while_the_store_is_away() -> None:
    unreachable = Store(create_db_engine(database_url("postgresql://nobody@127.0.0.1:1/none")))
    try:
        text = ExecutorMetrics(unreachable).exposition().decode()
    finally:
        unreachable.close()
    assert "host_engine_store_up 0.0" in text


def test_executor_config_retry_limits_are_respected(env: Env) -> None:
    env.droplet("d1")
    mid = env.migration("d1", max_attempts=1)
    env.world.inject_fault(attempt_id(mid, 1), Fault(FaultKind.LINK_DROP, Phase.MEMORY))
    ex = env.executor(retry=RetryConfig(max_attempts=1))
    env.drive(ex, lambda: env.state(mid) is S.OFFLINE_REQUIRED)
    assert env.store.get_migration(mid).stats["last_attempt"]["abort_reason"] in ("no_transfer", "stalled")


def test_executor_starts_early_when_the_guest_acknowledged_ready(env: Env) -> None:
    env.droplet("d1")
    now = env.store.clock()
    (m,) = env.store.create_migrations(
        [NewMigration("d1", "a", "b", now + timedelta(minutes=30), now, now + timedelta(hours=1))]
    )
    env.store.transition(m.id, S.NOTIFIED, notified_at=now)
    ex = env.executor()
    ex.tick()
    assert env.state(m.id) is S.NOTIFIED
    env.store.update_migration(m.id, ack="ready")
    env.drive(ex, lambda: env.state(m.id) is S.COMPLETED, max_s=600)
    env.assert_on_exactly("d1", "b")


def test_executor_metrics_and_timeline_describe_what_happened(env: Env) -> None:
    # Libvirt's background disk mirror, where the database needs the temporary write limit (under the
    # write-blocking mirror, the default, nothing is dirtied and no limit comes on).
    env.world.default_host_model = HostModel(sync_disk_writes=False)
    env.droplet("d1", workload=database())
    mid = env.migration("d1")
    metrics = ExecutorMetrics(env.store)
    ex = env.executor()
    ex.metrics = metrics
    ex.run_until_idle()
    text = metrics.exposition().decode()
    assert 'host_engine_migration_attempts_total{outcome="completed"} 1.0' in text
    assert 'host_engine_migrations{state="completed"} 1.0' in text
    assert "host_engine_migration_downtime_seconds_bucket" in text
    assert "host_engine_migration_disk_limit_seconds_total" in text
    rows = timeline(env.store, mid)
    assert rows[0]["phase"] == "disk"
    assert rows[-1]["phase"] == "done"
    assert {r["attempt"] for r in rows} == {1}
    assert any(r["disk_write_limit_bps"] for r in rows)  # the database got its temporary limit
    assert rows[-1]["disk_write_limit_bps"] is None


def wall_clock_executor(env: Env, wall: list[float]) -> Executor:
    """An executor of worker w1 whose store work follows ``wall[0]`` (seconds), for outage tests."""
    return Executor(
        env.store,
        SimHypervisor(env.world),
        ExecutorConfig(worker="w1"),
        env.clock,
        hooks=env.hooks,
        rand=lambda: 0.5,
        monotonic=lambda: wall[0],
    )


def test_executor_store_outage_at_the_end_records_the_outcome_when_the_store_answers(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    env.droplet("d1")
    mid = env.migration("d1")
    real_complete = env.store.complete
    outages = [StoreError("store error: connection refused")] * 3

    def flaky_complete(migration_id: str, **kw: object) -> Migration:
        if outages:
            raise outages.pop()
        return real_complete(migration_id, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(env.store, "complete", flaky_complete)
    wall = [0.0]
    ex = wall_clock_executor(env, wall)
    while env.world.droplets["d1"].host != "b":
        ex.tick()
        env.clock.sleep(0.5)
    # The droplet moved; the store could not say so yet: the attempt waits, it is not thrown away.
    for _ in range(3):
        ex.tick()
        wall[0] += 60.0
    assert not outages
    env.drive(ex, lambda: env.state(mid) is S.COMPLETED, max_s=120)
    env.assert_on_exactly("d1", "b")
    m = env.store.get_migration(mid)
    assert m.attempt == 1  # recorded by the attempt itself, not recovered and retried
    assert m.stats["last_attempt"]["downtime_ms"] is not None  # the real numbers of the attempt
    assert m.stats["last_attempt"]["bytes_transferred"] > DISK
    assert [c[0] for c in env.hooks.calls] == ["completed"]


def test_executor_store_lost_right_after_a_claim_keeps_the_attempt(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store goes away in the instant after a claim commits. The claimed attempt must still be this
    process's to supervise: before the fix it read the hypervisor spec after the claim, failed, never
    launched, and its own recovery threw attempt 1 away as an orphan once the store was back (seen on real
    PostgreSQL in the fleet's store-outage test)."""
    from host_engine.store.claims import ClaimsTx

    env.droplet("d1")
    mid = env.migration("d1")
    claimed = [False]
    failed = [False]
    real_claim_start = ClaimsTx.claim_start
    real_begin = env.store.begin

    def claim_start(self: ClaimsTx, *args: object, **kw: object) -> Migration | None:
        started = real_claim_start(self, *args, **kw)  # type: ignore[arg-type]
        claimed[0] = claimed[0] or started is not None
        return started

    def begin(*, readonly: bool = False) -> object:
        if claimed[0] and not failed[0]:
            failed[0] = True
            raise StoreError("store error: connection refused")
        return real_begin(readonly=readonly)

    monkeypatch.setattr(ClaimsTx, "claim_start", claim_start)
    monkeypatch.setattr(env.store, "begin", begin)
    wall = [0.0]
    ex = wall_clock_executor(env, wall)
    for _ in range(5):  # the outage, then store work (recovery included) again
        ex.tick()
        wall[0] += 60.0
        env.clock.sleep(0.5)
    assert failed[0]
    env.drive(ex, lambda: env.state(mid) is S.COMPLETED, max_s=300)
    env.assert_on_exactly("d1", "b")
    assert env.store.get_migration(mid).attempt == 1  # not recovered and retried


def test_executor_droplet_found_shut_off_at_start_gets_an_offline_copy(env: Env) -> None:
    env.droplet("d1")
    mid = env.migration("d1", power_on_after=False)
    env.world.droplets["d1"].state = DomainState.SHUT_OFF  # the owner powered it off; no ack
    done = env.executor().run_until_idle()
    assert [f.state for f in done] == [S.COMPLETED]
    m = env.store.get_migration(mid)
    assert m.offline
    assert m.stats["last_attempt"]["throttle_pct_s"] == 0
    assert m.stats["last_attempt"]["disk_limit_s"] == 0
    assert env.world.droplets["d1"].state is DomainState.SHUT_OFF
    env.assert_on_exactly("d1", "b")


def test_executor_sim_tick_step_follows_wall_time_and_keeps_the_world_in_the_store(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "engine.db")
    for name in ("a", "b"):
        store.add_host(Host(name, "nyc1", 32, 128 * GiB, 2000 * GiB, hypervisor_uri=f"sim://{name}"))
    store.add_droplet(Droplet("d1", "a", 2, MEMORY, DISK, addresses=("10.0.0.2",)))
    now = store.clock()
    (m,) = store.create_migrations([NewMigration("d1", "a", "b", now, now, now + timedelta(hours=1))])
    store.transition(m.id, S.NOTIFIED, notified_at=now)
    wall = [0.0]

    def monotonic() -> float:
        return wall[0]

    step = SimTickStep.open(store, ExecutorConfig(worker="w1"), speed=10.0, monotonic=monotonic)
    assert load_world(store) is not None  # created from the inventory and saved at once
    for _ in range(60):
        wall[0] += 1.0  # one engine poll per wall second: 10 simulated seconds each
        step.tick()
        if store.get_migration(m.id).state is S.COMPLETED:
            break
    assert store.get_migration(m.id).state is S.COMPLETED
    assert step.world.time_s == pytest.approx(10.0 * wall[0])
    # A restart finds the moved droplet in the stored world.
    again = SimTickStep.open(store, ExecutorConfig(worker="w1"), monotonic=monotonic)
    assert again.world.droplets["d1"].host == "b"
    assert again.world.hosts_holding("d1") == ["b"]
    store.close()


def test_executor_a_migration_waiting_for_its_guest_does_not_block_the_queue(env: Env) -> None:
    env.droplet("d1")
    env.droplet("d2")
    waiting = env.migration("d1")
    env.store.update_migration(waiting, ack="offline")  # the guest will shut down... but has not yet
    env.clock.sleep(1.0)  # so the waiting one is first in the queue
    other = env.migration("d2")
    ex = env.executor(max_concurrent=1)
    env.drive(ex, lambda: env.state(other) is S.COMPLETED, max_s=600)
    assert env.state(waiting) is S.NOTIFIED
    assert kinds(env.store, waiting).count("wait") == 1
    assert "claim" not in kinds(env.store, waiting)
    env.world.droplets["d1"].state = DomainState.SHUT_OFF
    env.drive(ex, lambda: env.state(waiting) is S.COMPLETED, max_s=600)


def test_executor_placement_chooser_retries_on_the_best_remaining_host(env: Env) -> None:
    env.droplet("d1")
    mid = env.migration("d1")
    env.world.inject_fault(attempt_id(mid, 1), Fault(FaultKind.TARGET_CRASH, Phase.DISK, after_s=1))
    ex = env.executor(choose_target=placement_chooser(env.store, PlacementConfig()))
    env.drive(ex, lambda: env.state(mid) is S.COMPLETED)
    assert env.store.get_migration(mid).target_host == "c"
    env.assert_on_exactly("d1", "c")
    only_failed = placement_chooser(env.store, PlacementConfig())
    assert only_failed(env.store.get_migration(mid), frozenset({"a", "b", "c"})) is None


def test_executor_step_builds_the_engine_loop_step_for_each_driver(env: Env) -> None:
    config = EngineConfig(engine=EngineLoopConfig(worker="w9", poll_interval_s=2.0))
    sim_step = executor_step(env.store, config, driver="sim")
    assert isinstance(sim_step, SimTickStep)
    assert sim_step.executor.config.worker == "w9"
    assert sim_step.executor.config.tick_s == 2.0
    assert set(sim_step.world.hosts) == {"a", "b", "c"}
    # [controller] and [libvirt] reach the controller (both drivers) and the libvirt hypervisor.
    config = config_from_dict(
        {
            "engine": {"worker": "w9"},
            "controller": {"max_downtime_ms": 120},
            "libvirt": {"bandwidth_mibps": 64, "tls": True, "peer_uris": {"b": "qemu+tls://b.mig/system"}},
        }
    )
    sim_step = executor_step(env.store, config, driver="sim")
    assert sim_step.executor.config.controller.max_downtime_ms == 120
    # The driver follows from the host: sim:// hosts are never driven by libvirt, libvirt ones never simulated.
    with pytest.raises(InvalidInput, match="driven only by sim"):
        executor_step(env.store, config, driver="libvirt")
    with env.store.begin() as tx:
        for name in ("a", "b", "c"):
            tx.update_host(name, hypervisor_uri=f"qemu+tcp://{name}/system")
    with pytest.raises(InvalidInput, match="driven only by libvirt"):
        executor_step(env.store, config, driver="sim")
    libvirt_step = executor_step(env.store, config)
    assert isinstance(libvirt_step, Executor)
    assert libvirt_step.config.controller.max_downtime_ms == 120
    assert libvirt_step.hypervisor.options == {"bandwidth_mibps": "64", "tls": "1"}
    assert libvirt_step.hypervisor.peer_uris == {"b": "qemu+tls://b.mig/system"}
    with pytest.raises(InvalidInput, match="driver"):
        executor_step(env.store, config, driver="xen")


class SlowHypervisor(FileHypervisor):
    """Every call about a droplet's state takes 50 ms, as a remote libvirt call may."""

    def domain_state(self, host: str, droplet_id: str) -> DomainState:
        time.sleep(0.05)
        return super().domain_state(host, droplet_id)


def test_executor_tick_stays_short_with_a_large_backlog_of_waiting_migrations(tmp_path: Path) -> None:
    """300 offline copies due, every guest still running (the copy waits for it to shut down): a tick looks at
    a few of them (twice its free slots; each again only after a while), not at all 300 every tick (before:
    300 hypervisor calls per tick, 15 s here). Nor do they starve a startable migration queued behind them."""
    store = Store.open(tmp_path / "engine.db")
    hv = SlowHypervisor(tmp_path / "hv", duration_s=600.0)
    for name in ("a", "b"):
        store.add_host(Host(name, "nyc1", 4096, 4096 * GiB, 100_000 * GiB, hypervisor_uri=f"fake://{name}"))
    now = store.clock()
    early = now - timedelta(minutes=1)
    with store.begin() as tx:
        for i in range(301):
            tx.add_droplet(Droplet(f"d{i}", "a", 1, GiB, GiB, addresses=(f"10.1.{i // 250}.{i % 250 + 1}",)))
            # d0..d299: offline copies due first; d300: a live migration due after them.
            offline = i < 300
            new = NewMigration(f"d{i}", "a", "b", early if offline else now, now, now + timedelta(hours=1),
                               offline=offline)  # fmt: skip
            m = tx.create_migration(new)
            tx.transition(m.id, S.NOTIFIED, notified_at=now)
    hv.add_droplets([f"d{i}" for i in range(301)], "a")
    clock = StepClock()
    ex = Executor(store, hv, ExecutorConfig(worker="w1", max_concurrent=4), clock)
    for _ in range(3):
        started = time.monotonic()
        ex.tick()
        assert time.monotonic() - started < 2.0
        clock.sleep(1.0)
    assert not ex.active
    waiting = [m for m in store.list_migrations() if any(e.kind == "wait" for e in store.migration_log(m.id))]
    assert 0 < len(waiting) <= 3 * 8  # each told once why it waits
    hv.domain_state = super(SlowHypervisor, hv).domain_state  # type: ignore[method-assign]
    for _ in range(60):  # 300 / 8 ticks to get past the waiting ones (a tick a second)
        ex.tick()
        if ex.active:
            break
        clock.sleep(1.0)
    assert [a.migration.droplet_id for a in ex.active.values()] == ["d300"]
    store.close()


class ReportingHypervisor(FileHypervisor):
    """Recovery that still finds the finished job's own numbers on the hypervisor (libvirt's completed job)."""

    def recover(self, spec: MigrationSpec) -> str | Recovered:
        host = super().recover(spec)
        stats: dict[str, object] = {
            "downtime_ms": 42.0,
            "bytes_transferred": 5 * GiB,
            "duration_s": 7.5,
            "rounds": 3,
        }
        return Recovered(host, stats) if host == spec.target_host else host


def test_executor_recovered_success_records_the_hypervisors_numbers(tmp_path: Path) -> None:
    """A worker died after the switchover: the next one finds the droplet on the target and records the
    attempt as completed with the job's real numbers, not zeros."""
    store = Store.open(tmp_path / "engine.db")
    hv = ReportingHypervisor(tmp_path / "hv", duration_s=1.0)
    for name in ("a", "b"):
        store.add_host(Host(name, "nyc1", 64, 256 * GiB, 4000 * GiB, hypervisor_uri=f"fake://{name}"))
    store.add_droplet(Droplet("d1", "a", 1, GiB, 4 * GiB, addresses=("10.0.0.2",)))
    hv.add_droplet("d1", "a")
    now = store.clock()
    (m,) = store.create_migrations([NewMigration("d1", "a", "b", now, now, now + timedelta(hours=1))])
    store.transition(m.id, S.NOTIFIED, notified_at=now)
    with store.begin() as tx:  # the dead worker's claim and start, then its job ran to the end unwatched
        started = tx.claim_start(m.id, "dead", offline=False, lease_s=60, limits=ClaimLimits())
    assert started is not None
    spec = MigrationSpec(attempt_id(m.id, 1), "d1", "a", "b", "fake://a", "fake://b", 1, GiB, 4 * GiB)
    job = hv.migration(spec)
    job.start()
    hv.finish_now(spec.migration_id)
    assert job.progress().phase is Phase.DONE
    with store.begin() as tx:  # as a shutdown that ran out of time leaves it
        tx.release_claim(m.id, "dead")
    ex = Executor(store, hv, ExecutorConfig(worker="w2", threads=False), StepClock())
    done = ex.tick()
    assert [(f.migration_id, f.state) for f in done] == [(m.id, S.COMPLETED)]
    last = store.get_migration(m.id).stats["last_attempt"]
    assert (last["downtime_ms"], last["bytes_transferred"], last["duration_s"], last["rounds"]) == (
        42.0,
        5 * GiB,
        7.5,
        3,
    )
    assert last["recovered_by"] == "w2"
    assert store.get_droplet("d1").host == "b"
    store.close()


def test_executor_config_for_engine_takes_the_workers_and_the_fleets_settings() -> None:
    config = config_from_dict(
        {
            "engine": {"worker": "hv-a", "lease": "30s", "renew_every": "5s", "max_concurrent": 6},
            "concurrency": {"max_parallel": 8, "max_per_source": 3, "max_per_target": 1},
        }
    )
    ec = ExecutorConfig.for_engine(config)
    assert (ec.worker, ec.lease_s, ec.renew_every_s, ec.max_concurrent) == ("hv-a", 30.0, 5.0, 6)
    assert ec.limits == ClaimLimits(max_parallel=8, max_per_source=3, max_per_target=1)
    # migrate --now never passes for the run of the same name
    assert ExecutorConfig.for_engine(config, only=frozenset({"m-1"})).worker.startswith("hv-a/migrate-")
    assert ExecutorConfig.for_engine(config_from_dict({})).worker == socket.gethostname()  # stable default
    with pytest.raises(ConfigError, match=r"renew_every \(20s\) must be at most a third of lease \(30s\)"):
        config_from_dict({"engine": {"lease": "30s", "renew_every": "20s"}})
