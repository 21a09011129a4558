"""``host-engine report`` shows every completed attempt's switchover at the time it happened (issue 15.8: "mark
the switchover, the downtime ... on the timeline"), even when no controller tick saw the switchover phase: the
simulated hypervisor pauses the guest and completes within one tick, and libvirt's completion can arrive
between two ticks."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest

from host_engine.attempt import Outcome, run_migration
from host_engine.controller import Action, ControllerConfig, Switchover
from host_engine.drivers.base import AlreadyCompleted, MigrationSpec, Phase, Progress
from host_engine.drivers.sim import MiB, SimClock, SimHypervisor, SimMigrationDriver, SimWorld, Workload
from host_engine.executor import Executor, ExecutorConfig, request_abort
from host_engine.models import NewMigration
from host_engine.progress import progress_dict
from host_engine.samples import SampleBuffer, sample_rows
from host_engine.states import LogKind, MigrationState
from host_engine.store import Store
from host_engine.timeline import attempt_marks, timeline
from tests.unit.host_engine.cli_run import ok
from tests.unit.host_engine.conftest import GIB, T0, FakeClock, make_droplet, make_host
from tests.unit.host_engine.fake_admin import FakeAdmin

# progress_dict rounds elapsed_s to 10 ms.
ROUNDING_S = 0.011


def _migrate_and_report(db: str, clock: FakeClock, *extra: str) -> dict[str, object]:
    store = Store.open(db)
    store.add_droplet(make_droplet("db1", "hv1", memory_bytes=4 * GIB, disk_bytes=8 * GIB))
    store.close()
    ok(db, clock, "migrate", "db1", "--to", "hv2", "--now", "--unsafe-short-notice", "--driver", "sim")
    store = Store.open(db)
    [m] = store.list_migrations()
    store.close()
    doc: dict[str, object] = json.loads(ok(db, clock, "report", m.id, "--json", *extra).stdout)
    return doc


def test_report_of_a_sim_migration_has_its_switchover_at_the_time_it_paused(
    db: str, clock: FakeClock, admin: FakeAdmin, tmp_path: Path
) -> None:
    png = tmp_path / "m.png"
    doc = _migrate_and_report(db, clock, "--plot", str(png))
    rows = doc["timeline"]
    assert isinstance(rows, list)
    phases = [r["phase"] for r in rows]
    assert phases[-1] == "done", phases
    switchovers = [r for r in rows if r["phase"] == "switchover"]
    assert switchovers, f"no switchover sample in the record: {phases}"
    done = rows[-1]
    last_copy = [r for r in rows if r["phase"] in ("disk", "memory")][-1]
    sw = switchovers[0]
    # Between the last tick that saw the guest running and the end, and the pause lasted the downtime.
    assert last_copy["elapsed_s"] <= sw["elapsed_s"] < done["elapsed_s"], (last_copy, sw, done)
    assert done["downtime_ms"] is not None and sw["downtime_ms"] == done["downtime_ms"]
    assert sw["elapsed_s"] + done["downtime_ms"] / 1000 == pytest.approx(done["elapsed_s"], abs=ROUNDING_S)
    # Its place on the line from the last reading to the end: the plot draws no step that did not happen.
    assert (
        done["memory_remaining_bytes"] <= sw["memory_remaining_bytes"] <= last_copy["memory_remaining_bytes"]
    )
    [mark] = doc["attempts"]
    assert mark["completed"] is True
    assert mark["switchover_s"] == sw["elapsed_s"] and mark["end_s"] == done["elapsed_s"]
    assert png.stat().st_size > 0


def test_a_completion_between_two_ticks_gets_its_switchover_sample() -> None:
    """As libvirt reports it: memory samples, then the completed job (its elapsed time and downtime)."""
    buf = SampleBuffer(attempt=1)
    for i in range(5):
        buf.add({"elapsed_s": 10.0 + i, "phase": "memory", "memory_remaining_bytes": 1000 - 200 * i})
    buf.add({"elapsed_s": 14.5, "phase": "done", "memory_remaining_bytes": 0, "downtime_ms": 250.0})
    [rows] = sample_rows({"samples": [buf.to_json()]}).values()
    assert [r["phase"] for r in rows[-2:]] == ["switchover", "done"]
    sw = rows[-2]
    assert sw["elapsed_s"] == 14.25 and sw["downtime_ms"] == 250.0
    assert sw["memory_remaining_bytes"] == 100  # halfway from 200 (at 14 s) to 0 (at 14.5 s)


def test_a_switchover_seen_by_a_tick_is_not_added_again() -> None:
    buf = SampleBuffer(attempt=1)
    buf.add({"elapsed_s": 1.0, "phase": "memory"})
    buf.add({"elapsed_s": 2.0, "phase": "switchover"})
    buf.add({"elapsed_s": 3.0, "phase": "done", "downtime_ms": 400.0})
    phases = [r[1] for r in buf.to_json()["rows"]]
    assert phases == ["memory", "switchover", "done"]


def test_a_downtime_longer_than_the_gap_never_puts_the_switchover_before_a_running_sample() -> None:
    buf = SampleBuffer(attempt=1)
    buf.add({"elapsed_s": 1.0, "phase": "memory"})
    buf.add({"elapsed_s": 1.2, "phase": "done", "downtime_ms": 900.0})
    assert [(r[0], r[1]) for r in buf.to_json()["rows"]] == [
        (1.0, "memory"),
        (1.0, "switchover"),
        (1.2, "done"),
    ]


def _switch_in_round_2(p: Progress) -> tuple[Action, ...]:
    return (Switchover(),) if p.phase is Phase.MEMORY and p.round >= 2 else ()


@pytest.mark.parametrize("ordered", [True, False], ids=["ordered-switchover", "qemu-switchover"])
def test_the_recorded_switchover_is_when_the_sim_paused_the_guest(ordered: bool) -> None:
    """The executor's samples of a sim migration (one every 1 s tick, as ``migrate --now``) against the sim's
    own record of when it paused the guest: on the engine's order, or QEMU's own once the rest fits."""
    world = SimWorld(7)
    for h in ("src", "dst"):
        world.add_host(h, nic_bps=1250 * MiB)
    busy = Workload("busy", disk_rate_bps=4 * MiB, memory_rate_bps=64 * MiB, memory_hot_bytes=256 * MiB)
    world.add_droplet("g", "src", memory_bytes=2 * GIB, disk_bytes=4 * GIB, workload=busy)
    spec = MigrationSpec("m", "g", "src", "dst", "sim://src", "sim://dst", 2, 2 * GIB, 4 * GIB)
    buf = SampleBuffer(attempt=1)
    result = run_migration(
        SimHypervisor(world).migration(spec),
        # A 1 ms limit: QEMU never finds the rest small enough, the order comes first.
        ControllerConfig(max_downtime_ms=1) if ordered else ControllerConfig(),
        SimClock(world),
        tick_s=1.0,
        on_progress=lambda p: buf.add(progress_dict(p)),
        policy=_switch_in_round_2 if ordered else None,
    )
    assert result.outcome is Outcome.COMPLETED and result.downtime_ms is not None
    mig = world.migrations["m"]
    assert mig.switchover_at_s is not None and mig.auto_switchover is not ordered
    rows = sample_rows({"samples": [buf.to_json()]})[1]
    [sw] = [r for r in rows if r["phase"] == "switchover"]
    assert sw["elapsed_s"] == pytest.approx(mig.switchover_at_s - mig.started_at_s, abs=ROUNDING_S)
    assert rows[-1]["elapsed_s"] == pytest.approx(
        mig.switchover_at_s - mig.started_at_s + result.downtime_ms / 1000, abs=ROUNDING_S
    )


def test_a_switchover_at_the_same_instant_as_a_logged_change_stays_in_the_timeline(
    sqlite_store: Store, clock: FakeClock
) -> None:
    """The engine's order to switch over is given at a tick: the pause starts at that tick's time, which a
    logged progress change may carry too."""
    sqlite_store.add_host(make_host("hv1"))
    sqlite_store.add_host(make_host("hv2"))
    sqlite_store.add_droplet(make_droplet("d1", "hv1"))
    now = clock()
    [m] = sqlite_store.create_migrations(
        [NewMigration("d1", "hv1", "hv2", now, now, now + timedelta(hours=1))]
    )
    sqlite_store.transition(m.id, MigrationState.NOTIFIED, notified_at=now)
    sqlite_store.transition(m.id, MigrationState.RUNNING)
    buf = SampleBuffer(attempt=1)
    for sample in (
        {"elapsed_s": 4.0, "phase": "memory", "round": 1},
        {"elapsed_s": 5.0, "phase": "memory", "round": 2},
        {"elapsed_s": 5.09, "phase": "done", "round": 2, "downtime_ms": 90.0},
    ):
        buf.add(sample)
        if sample["elapsed_s"] != 4.0:  # a new round and the end are logged changes
            sqlite_store.append_log(m.id, LogKind.PROGRESS, "change", droplet_id="d1", data=sample)
    sqlite_store.update_migration(m.id, stats={"samples": [buf.to_json()]})
    rows = timeline(sqlite_store, m.id)
    assert [(r["elapsed_s"], r["phase"]) for r in rows] == [
        (4.0, "memory"),
        (5.0, "memory"),
        (5.0, "switchover"),
        (5.09, "done"),
    ]
    [mark] = attempt_marks(sqlite_store.migration_log(m.id), rows, None)
    assert mark.switchover_s == 5.0


def test_a_long_attempt_keeps_the_last_copying_sample_before_the_switchover() -> None:
    """Past the cap only every n-th sample is kept; the one just before the pause still is (else the line to
    the switchover would start up to n ticks early)."""
    buf = SampleBuffer(attempt=1, cap=10)
    for i in range(45):
        buf.add({"elapsed_s": float(i), "phase": "memory"})
    buf.add({"elapsed_s": 45.0, "phase": "switchover"})
    buf.add({"elapsed_s": 45.1, "phase": "done"})
    times = [r[0] for r in buf.to_json()["rows"]]
    assert times[-3:] == [44.0, 45.0, 45.1], times


class CompletesWhenAborted:
    """The sim's migration driver, except that the job completes while the engine asks it to abort (as
    libvirt's can: the abort finds the job done), so the completed snapshot never passes a controller tick."""

    def __init__(self, inner: SimMigrationDriver, world: SimWorld) -> None:
        self.inner, self.world = inner, world

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def abort(self) -> None:
        self.inner.switchover()
        for _ in range(10_000):
            if self.inner.progress().phase is Phase.DONE:
                raise AlreadyCompleted("the job completed before the abort")
            self.world.advance(0.01)
        raise AssertionError("the sim did not complete the switchover")


class RacingHypervisor:
    def __init__(self, world: SimWorld) -> None:
        self.inner, self.world = SimHypervisor(world), world

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def migration(self, spec: MigrationSpec) -> CompletesWhenAborted:
        return CompletesWhenAborted(self.inner.migration(spec), self.world)


def test_an_abort_that_finds_the_job_completed_records_its_switchover(tmp_path: Path) -> None:
    world = SimWorld(5)
    store = Store.open(tmp_path / "engine.db", clock=lambda: T0 + timedelta(seconds=world.time_s))
    for name in ("a", "b"):
        world.add_host(name)
        store.add_host(make_host(name, hypervisor_uri=f"sim://{name}", metadata_url="http://x/"))
    # Memory rewritten faster than the link carries it: only the switchover in abort() ends the copy.
    hot = Workload("hot", disk_rate_bps=MiB, memory_rate_bps=2 * 1250 * MiB, memory_hot_bytes=256 * MiB)
    world.add_droplet("d1", "a", memory_bytes=256 * MiB, disk_bytes=GIB, workload=hot)
    store.add_droplet(make_droplet("d1", "a", memory_bytes=256 * MiB, disk_bytes=GIB))
    now = store.clock()
    [m] = store.create_migrations([NewMigration("d1", "a", "b", now, now, now + timedelta(hours=1))])
    store.transition(m.id, MigrationState.NOTIFIED, notified_at=now)
    clock = SimClock(world)
    ex = Executor(store, RacingHypervisor(world), ExecutorConfig(worker="w1"), clock, rand=lambda: 0.5)  # type: ignore[arg-type]
    for _ in range(600):
        ex.tick()
        clock.sleep(ex.config.tick_s)
        if store.get_migration(m.id).stats.get("progress", {}).get("phase") == "memory":
            break
    request_abort(store, m.id, by="alice")
    for _ in range(600):
        if store.get_migration(m.id).state.is_terminal:
            break
        ex.tick()
        clock.sleep(ex.config.tick_s)
    assert store.get_migration(m.id).state is MigrationState.COMPLETED
    rows = timeline(store, m.id)
    assert [r["phase"] for r in rows[-2:]] == ["switchover", "done"], [r["phase"] for r in rows]
    [mark] = attempt_marks(store.migration_log(m.id), rows, store.get_migration(m.id).stats["last_attempt"])
    assert mark.completed and mark.switchover_s == rows[-2]["elapsed_s"]
    store.close()
