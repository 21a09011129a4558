"""``host-engine force-complete`` and ``--bandwidth`` (issue 15 item 7), on the sim driver: through the executor
(in-memory world, simulated clock) and through the CLI (SQLite store, the store-backed sim, a FakeClock)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from host_engine.config import EngineConfig
from host_engine.controller import DEFAULT_DISK_LIMIT_FLOOR_BPS, DEFAULT_MAX_DOWNTIME_MS, GiB, MiB
from host_engine.drivers.base import DomainState
from host_engine.drivers.sim import SimClock, SimHypervisor, SimWorld, diabolical, idle
from host_engine.engine_steps import SimTickStep, executor_step
from host_engine.errors import Conflict
from host_engine.executor import Executor, ExecutorConfig
from host_engine.metadata.reconcile import MetadataSync, default_client_factory
from host_engine.models import Droplet, Host, NewMigration
from host_engine.requests import request_force_complete, with_bandwidth
from host_engine.states import MigrationState as S
from host_engine.store import Store
from tests.unit.host_engine.cli_run import invoke, ok, one_error, only_migration
from tests.unit.host_engine.conftest import FakeClock, wall
from tests.unit.host_engine.fake_admin import FakeAdmin

T0 = datetime(2026, 12, 1, 2, 0, tzinfo=UTC)
MEMORY = GiB
DISK = 8 * GiB
# The budget the controller keeps to (and a forced switchover is allowed to exceed).
BUDGET_MS = DEFAULT_MAX_DOWNTIME_MS


# ---- through the executor ------------------------------------------------------------------------------


class Env:
    def __init__(self, world: SimWorld, store: Store) -> None:
        self.world, self.store, self.clock = world, store, SimClock(world)
        self.ex = Executor(
            store, SimHypervisor(world), ExecutorConfig(worker="w1"), self.clock, rand=lambda: 0.5
        )

    def migration(self, droplet_id: str, *, stats: dict[str, object] | None = None) -> str:
        now = self.store.clock()
        (m,) = self.store.create_migrations(
            [NewMigration(droplet_id, "a", "b", now, now, now + timedelta(hours=1), stats=stats or {})]
        )
        self.store.transition(m.id, S.NOTIFIED, notified_at=now)
        return m.id

    def progress_phase(self, mid: str) -> str | None:
        p = self.store.get_migration(mid).stats.get("progress")
        return p.get("phase") if isinstance(p, dict) else None

    def drive(self, until: Callable[[], bool], max_s: float) -> float:
        """Tick until ``until()``; the simulated seconds it took."""
        started = self.clock.now()
        while not until():
            assert self.clock.now() - started < max_s, "did not happen in time"
            self.ex.tick()
            self.clock.sleep(self.ex.config.tick_s)
        return self.clock.now() - started


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    world = SimWorld(7)
    store = Store.open(tmp_path / "engine.db", clock=lambda: T0 + timedelta(seconds=world.time_s))
    for name in ("a", "b"):
        world.add_host(name)
        store.add_host(Host(name, "nyc1", 32, 128 * GiB, 2000 * GiB, hypervisor_uri=f"sim://{name}"))
    # A guest that sweeps its memory at 5x the link: it never converges by itself (the controller gives up
    # on it as not_converging, twice, then sends it offline: test_executor.py).
    store.add_droplet(Droplet("d1", "a", 2, MEMORY, DISK, addresses=("10.0.0.2",)))
    world.add_droplet("d1", "a", memory_bytes=MEMORY, disk_bytes=DISK, workload=diabolical(link_multiple=5))
    yield Env(world, store)
    store.close()


def test_force_complete_in_the_memory_phase_switches_over_at_once_with_more_downtime(env: Env) -> None:
    mid = env.migration("d1")
    env.drive(lambda: env.progress_phase(mid) == "memory", max_s=120)
    request_force_complete(env.store, mid, by="alice", reason="host dies at 03:00")
    took_s = env.drive(lambda: env.store.get_migration(mid).state is S.COMPLETED, max_s=30)
    assert took_s < 15  # picked up and switched over within seconds, not left to the controller
    m = env.store.get_migration(mid)
    assert m.attempt == 1
    last = m.stats["last_attempt"]
    assert last["outcome"] == "completed"
    assert last["downtime_ms"] > BUDGET_MS  # the operator accepted more than the budget
    assert (last["forced_by"], last["force_reason"]) == ("alice", "host dies at 03:00")
    assert env.store.get_droplet("d1").host == "b"
    assert env.world.hosts_holding("d1") == ["b"]
    d = env.world.droplets["d1"]
    assert (d.state, d.throttle_pct, d.disk_limit_bps) == (DomainState.RUNNING, 0, None)
    [entry] = [e for e in env.store.migration_log(mid) if e.kind == "force_complete"]
    assert "alice" in entry.message and "host dies at 03:00" in entry.message


def test_force_complete_in_the_disk_phase_holds_disk_writes_then_switches_over_as_memory_starts(
    env: Env,
) -> None:
    mid = env.migration("d1")
    env.drive(lambda: env.progress_phase(mid) == "disk", max_s=60)
    request_force_complete(env.store, mid, by="bob", reason="maintenance window closing")
    env.drive(lambda: env.world.droplets["d1"].disk_limit_bps is not None, max_s=15)
    # The strongest limit the controller allows, while the mirror finishes (no pause in the disk phase).
    assert env.world.droplets["d1"].disk_limit_bps == DEFAULT_DISK_LIMIT_FLOOR_BPS
    assert env.world.droplets["d1"].state is DomainState.RUNNING
    env.drive(lambda: env.store.get_migration(mid).state is S.COMPLETED, max_s=300)
    m = env.store.get_migration(mid)
    assert m.attempt == 1 and m.stats["last_attempt"]["downtime_ms"] > BUDGET_MS
    # Switched over in the first memory round: the guest was never left to the controller's rounds.
    memory_rounds = [
        e.data["round"]
        for e in env.store.migration_log(mid)
        if e.kind == "progress" and e.data["phase"] == "memory"
    ]
    assert max(memory_rounds, default=0) <= 1
    d = env.world.droplets["d1"]
    assert (d.host, d.disk_limit_bps, d.throttle_pct) == ("b", None, 0)


def test_force_complete_of_a_migration_that_is_not_running_is_refused(env: Env) -> None:
    mid = env.migration("d1")
    with pytest.raises(Conflict, match="is notified: nothing running to force-complete"):
        request_force_complete(env.store, mid, by="alice", reason="why not")
    assert "force_complete" not in env.store.get_migration(mid).stats


def test_a_bandwidth_stored_with_the_migration_caps_its_copy(env: Env) -> None:
    """The option reaches the driver: at 100 MiB/s, 9 GiB cannot move in less than 92 s (the link: ~8 s)."""
    env.store.add_droplet(Droplet("quiet", "a", 1, MEMORY, DISK, addresses=("10.0.0.3",)))
    env.world.add_droplet("quiet", "a", memory_bytes=MEMORY, disk_bytes=DISK, workload=idle())
    mid = env.migration("quiet", stats=with_bandwidth({}, 100))
    env.drive(lambda: env.store.get_migration(mid).state is S.COMPLETED, max_s=600)
    last = env.store.get_migration(mid).stats["last_attempt"]
    assert last["duration_s"] >= (DISK + MEMORY) / (100 * MiB) - 1


# ---- through the CLI -----------------------------------------------------------------------------------


def running_worker(db: str, clock: FakeClock) -> tuple[Store, SimTickStep]:
    store = Store.open(db, clock=clock)
    sync = MetadataSync(store, default_client_factory(attempts=1, sleep=lambda s: None))
    step = executor_step(
        store, EngineConfig(), driver="sim", hooks=sync, monotonic=lambda: wall(clock), sim_speed=5
    )
    assert isinstance(step, SimTickStep)
    return store, step


def test_cli_force_complete_logs_the_reason_shows_it_in_status_and_report_and_completes(
    db: str, clock: FakeClock, admin: FakeAdmin
) -> None:
    ok(db, clock, "migrate", "web1", "--to", "hv2", "--start", "+5s", "--notice", "5s", "--unsafe-short-notice",
       "--bandwidth", "50MiB/s")  # fmt: skip
    ok(db, clock, "run", "--max-ticks", "1")  # the notice
    mid = only_migration(db).id  # type: ignore[attr-defined]
    one_error(invoke(db, clock, "force-complete", mid, "--reason", "x"), 4, "is notified: nothing running")
    clock.advance(5)
    store, step = running_worker(db, clock)

    def phase() -> object:
        p = store.get_migration(mid).stats.get("progress")
        return p.get("phase") if isinstance(p, dict) else None

    for _ in range(200):
        if phase() == "memory":
            break
        clock.advance(1)
        step.tick()
    assert phase() == "memory"
    r = ok(db, clock, "force-complete", mid, "--reason", "rack power work", "--by", "carol")
    assert "force-complete requested" in r.output and "switches over within seconds" in r.output
    status = ok(db, clock, "status").output
    [row] = [line for line in status.splitlines() if mid in line]
    assert "force-complete requested" in row and "cap 50MiB/s" in row, status
    for _ in range(30):
        if store.get_migration(mid).state is S.COMPLETED:
            break
        clock.advance(1)
        step.tick()
    m = store.get_migration(mid)
    assert m.state is S.COMPLETED and m.attempt == 1
    assert m.stats["last_attempt"]["downtime_ms"] > BUDGET_MS
    store.close()

    doc = json.loads(ok(db, clock, "report", mid, "--json").output)
    forced = doc["migration"]["stats"]["force_complete"]
    assert (forced["by"], forced["reason"], forced["attempt"]) == ("carol", "rack power work", 1)
    assert doc["migration"]["stats"]["last_attempt"]["force_reason"] == "rack power work"
    assert doc["migration"]["stats"]["bandwidth_mibps"] == 50
    text = ok(db, clock, "report", mid).output
    assert "force-complete requested by carol: rack power work" in text and "bandwidth cap: 50MiB/s" in text
    history = ok(db, clock, "history", "web1").output
    assert "force_complete" in history and "rack power work" in history
    # Over: nothing left to force.
    one_error(invoke(db, clock, "force-complete", mid, "--reason", "again"), 4, "is completed")


FORCE_BAD = [
    ("unknown", ["force-complete", "m-nope", "--reason", "x"], 3, "unknown migration 'm-nope'"),
    ("blank reason", ["force-complete", "m-nope", "--reason", "   "], 2, "--reason must say why"),
    ("no reason", ["force-complete", "m-nope"], 2, "Missing option '--reason'"),
    ("escape codes", ["force-complete", "m-nope", "--reason", "ok\x1b[2J"], 2, "printable"),
    ("long reason", ["force-complete", "m-nope", "--reason", "x" * 501], 2, "longer than 500"),
]


@pytest.mark.parametrize(
    ("args", "code", "message"), [c[1:] for c in FORCE_BAD], ids=[c[0] for c in FORCE_BAD]
)
def test_cli_force_complete_refuses_in_one_line(
    db: str, clock: FakeClock, args: list[str], code: int, message: str
) -> None:
    one_error(invoke(db, clock, *args), code, message)


BANDWIDTH_BAD = [
    "",
    "   ",
    "/s",
    "200",
    "-5MiB/s",
    "0MiB/s",
    "512KiB/s",
    "200MiB/h",
    "abc",
    "nanMiB/s",
    "1e9MiB/s",
    "99999999999999999999PiB/s",
    "200MiB/s; rm -rf /",
    "\uff12\uff10\uff10MiB/s",  # full-width digits
]


@pytest.mark.parametrize("value", BANDWIDTH_BAD)
@pytest.mark.parametrize("command", ["migrate web1 --start +1h", "evacuate hv1 --start +1h"])
def test_bandwidth_hostile_values_are_refused_in_one_line_and_nothing_is_written(
    db: str, clock: FakeClock, command: str, value: str
) -> None:
    r = invoke(db, clock, *command.split(), "--bandwidth", value)
    one_error(r, 2, "--bandwidth")
    store = Store.open(db)
    try:
        assert store.list_migrations() == []
        assert store.get_host("hv1").state.value == "active"
    finally:
        store.close()


def test_bandwidth_is_stored_sizes_the_slots_and_shows_in_status(db: str, clock: FakeClock) -> None:
    """Slots are (disk + memory) / bandwidth + overhead: at 100 MiB/s web1 (5 GiB) holds 51 s + 2 min and big
    (204 GiB) 2089 s + 2 min; with one migration at a time the second starts when the first's slot ends."""
    r = ok(db, clock, "evacuate", "hv1", "--start", "+1h", "--max-parallel", "1", "--bandwidth", "100MiB/s",
           "--json")  # fmt: skip
    doc = json.loads(r.output)
    estimates = {mv["droplet"]: mv["estimate_s"] for mv in doc["moves"]}
    overhead_s = 120
    assert estimates == {"big": round(204 * GiB / (100 * MiB)) + overhead_s, "web1": 51 + overhead_s}
    store = Store.open(db)
    try:
        ms = sorted(store.list_migrations(), key=lambda m: m.not_before)
    finally:
        store.close()
    assert [m.stats["bandwidth_mibps"] for m in ms] == [100, 100]
    assert ms[1].not_before - ms[0].not_before == timedelta(seconds=estimates[ms[0].droplet_id])
    status = ok(db, clock, "status").output
    assert status.count("cap 100MiB/s") == 2, status
    # Without --bandwidth: the configured bandwidth (1 GiB/s) and nothing stored.
    ok(db, clock, "cancel", "--host", "hv1")
    r = ok(db, clock, "migrate", "web1", "--start", "+2h", "--json")
    [mv] = json.loads(r.output)["moves"]
    assert mv["estimate_s"] == 5 + overhead_s
    store = Store.open(db)
    try:
        [m] = [m for m in store.list_migrations() if m.state is S.PLANNED]
        assert "bandwidth_mibps" not in m.stats
    finally:
        store.close()


def test_the_bandwidth_of_a_migration_already_planned_sizes_its_slot_for_later_plans(
    db: str, clock: FakeClock
) -> None:
    ok(db, clock, "migrate", "web1", "--to", "hv2", "--start", "+1h", "--bandwidth", "10MiB/s")
    # At 10 MiB/s web1 holds 512 s + 2 min; with one migration at a time fleet-wide, big waits for its end.
    r = ok(db, clock, "evacuate", "hv1", "--start", "+1h", "--max-parallel", "1", "--json")
    [mv] = json.loads(r.output)["moves"]
    first = planned_at(db, "web1")
    assert datetime.fromisoformat(mv["not_before"].replace("Z", "+00:00")) == first + timedelta(
        seconds=512 + 120
    )


def planned_at(db: str, droplet_id: str) -> datetime:
    store = Store.open(db)
    try:
        [m] = [m for m in store.list_migrations() if m.droplet_id == droplet_id]
        return m.not_before
    finally:
        store.close()
