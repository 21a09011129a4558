"""The CLI over the executor: ``migrate --now``, ``abort``, ``report``, ``status`` progress and ``run`` executing
migrations, on SQLite with the simulated hypervisor. The admin API is faked at the transport; the clock is a
FakeClock that the sim's wall clock follows, so nothing sleeps."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from host_engine.config import EngineConfig
from host_engine.drivers.base import DomainState
from host_engine.drivers.sim import load_world
from host_engine.engine_steps import SimTickStep, executor_step
from host_engine.metadata.reconcile import MetadataSync, default_client_factory
from host_engine.states import MigrationState
from host_engine.store import Store
from tests.unit.host_engine.cli_run import invoke, ok, one_error, only_migration, snapshot
from tests.unit.host_engine.conftest import FakeClock, wall
from tests.unit.host_engine.fake_admin import FakeAdmin

S = MigrationState


# ---- migrate --now -----------------------------------------------------------------------------------------


def test_migrate_now_notifies_runs_prints_progress_and_completes(
    db: str, clock: FakeClock, admin: FakeAdmin
) -> None:
    r = ok(db, clock, "migrate", "web1", "--to", "hv2", "--now", "--unsafe-short-notice", "--sim-speed", "1")
    out = r.output
    assert "notice sent" in out
    assert "attempt 1 (live) hv1 -> hv2" in out
    # Progress lines with percent and ETA. QEMU switches over by itself as soon as its 1 GiB of RAM has gone
    # once, so the memory phase lasts under a tick: the line with an ETA is the disk copy's.
    assert re.search(r", round \d+, \d+ %, .* ETA \d", out), out
    assert "completed: web1 now runs on hv2" in out.splitlines()[-1]
    m = only_migration(db)
    assert m.state is S.COMPLETED
    store = Store.open(db)
    assert store.get_droplet("web1").host == "hv2"
    world = load_world(store)
    store.close()
    assert world is not None and world.hosts_holding("web1") == ["hv2"]
    # The guest was told (registered, flag set), then the flag cleared after the switch.
    assert ("PUT", "/admin/v1/droplets/web1/maintenance") in admin.calls
    assert admin.event("web1") is None

    report = ok(db, clock, "report", m.id).output
    assert "ATTEMPT" in report and "REMAINING" in report and "disk" in report
    doc = json.loads(ok(db, clock, "report", m.id, "--json").output)
    assert doc["migration"]["state"] == "completed"
    assert [row["phase"] for row in doc["timeline"]][-1] == "done"


def test_migrate_now_json_ends_with_the_result(db: str, clock: FakeClock, admin: FakeAdmin) -> None:
    r = ok(db, clock, "migrate", "web1", "--now", "--unsafe-short-notice", "--json")
    doc = json.loads(r.output.splitlines()[-1])  # one object per line; test_cli_progress.py has the stream
    assert doc["type"] == "result" and doc["state"] == "completed" and doc["timeline"]


MIGRATE_BAD = [
    ("no unsafe flag", ["migrate", "web1", "--now"], 2, "add --unsafe-short-notice"),
    ("now and start", ["migrate", "web1", "--now", "--unsafe-short-notice", "--start", "+1h"], 2, "exclude"),
    ("neither", ["migrate", "web1"], 2, "Missing option '--start'"),
    ("unknown droplet", ["migrate", "ghost", "--now", "--unsafe-short-notice"], 3, "unknown droplet"),
    ("bad driver", ["migrate", "web1", "--now", "--unsafe-short-notice", "--driver", "xen"], 2, "'--driver'"),
    (
        "bad sim speed",
        ["migrate", "web1", "--now", "--unsafe-short-notice", "--sim-speed", "0"],
        2,
        "sim-speed",
    ),
    ("unknown abort", ["abort", "m-nope"], 3, "unknown migration 'm-nope'"),
    ("unknown report", ["report", "m-nope"], 3, "unknown migration 'm-nope'"),
    ("bad run driver", ["run", "--driver", "xen", "--max-ticks", "1"], 2, "Invalid value for '--driver'"),
    ("bad config driver", ["--set", "engine.driver=xen", "run", "--max-ticks", "1"], 6, "[engine] driver"),
    (
        "downtime budget too small",
        ["--set", "controller.max_downtime_ms=1", "run", "--max-ticks", "1"],
        6,
        "[controller] max_downtime_ms: must be within 10..10000",
    ),
    (
        "negative bandwidth cap",
        ["--set", "libvirt.bandwidth_mibps=-5", "run", "--driver", "libvirt", "--max-ticks", "1"],
        6,
        "[libvirt] bandwidth_mibps",
    ),
    (
        "bad peer uri",
        ["--set", "libvirt.peer_uris.hv2=hv2", "migrate", "web1", "--now", "--unsafe-short-notice"],
        6,
        "[libvirt] peer_uris.hv2: expected a libvirt URI",
    ),
    (
        "bad metrics listen",
        ["run", "--metrics-listen", "here:port", "--max-ticks", "1"],
        2,
        "--metrics-listen",
    ),
]


@pytest.mark.parametrize(("what", "args", "code", "message"), MIGRATE_BAD, ids=[b[0] for b in MIGRATE_BAD])
def test_bad_input_is_one_line_nonzero_and_changes_nothing(
    db: str, clock: FakeClock, admin: FakeAdmin, what: str, args: list[str], code: int, message: str
) -> None:
    before = snapshot(db)
    one_error(invoke(db, clock, *args), code, message)
    assert snapshot(db) == before
    assert admin.calls == []


def test_run_hands_the_libvirt_and_controller_sections_to_the_executor(
    db: str, clock: FakeClock, admin: FakeAdmin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``run --driver libvirt`` builds LibvirtHypervisor from [libvirt]; both drivers get [controller]."""
    import host_engine.wiring as cli_module

    built: list[Any] = []

    def capture(*args: Any, **kwargs: Any) -> Any:
        built.append(executor_step(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(cli_module, "executor_step", capture)
    settings = [
        "--set", "controller.max_downtime_ms=80",
        "--set", "libvirt.bandwidth_mibps=250",
        "--set", "libvirt.tls=true",
        "--set", "libvirt.peer_uris.hv2=qemu+tls://hv2.migration.example/system",
    ]  # fmt: skip
    ok(db, clock, *settings, "run", "--driver", "libvirt", "--max-ticks", "1")
    step = built[-1]
    assert step.config.controller.max_downtime_ms == 80
    assert step.hypervisor.options == {"bandwidth_mibps": "250", "tls": "1"}
    assert step.hypervisor.peer_uris == {"hv2": "qemu+tls://hv2.migration.example/system"}
    ok(db, clock, *settings, "run", "--max-ticks", "1")
    assert isinstance(built[-1], SimTickStep)
    assert built[-1].executor.config.controller.max_downtime_ms == 80


# ---- abort, status ---------------------------------------------------------------------------------------


def test_abort_before_start_cancels_and_clears_the_event(db: str, clock: FakeClock, admin: FakeAdmin) -> None:
    ok(db, clock, "migrate", "web1", "--start", "+10s", "--notice", "10s", "--unsafe-short-notice")
    ok(db, clock, "run", "--max-ticks", "1")  # sends the notice
    m = only_migration(db)
    assert m.state is S.NOTIFIED and admin.event("web1") is not None
    r = ok(db, clock, "abort", m.id)
    assert "cancelled" in r.output
    assert only_migration(db).state is S.CANCELLED
    assert admin.event("web1") is None
    one_error(invoke(db, clock, "abort", m.id), 4, "nothing to abort")


def test_status_shows_a_running_migrations_progress_and_abort_leaves_the_source_untouched(
    db: str, clock: FakeClock, admin: FakeAdmin
) -> None:
    ok(
        db,
        clock,
        "migrate",
        "big",
        "--to",
        "hv3",
        "--start",
        "+5s",
        "--notice",
        "5s",
        "--unsafe-short-notice",
    )
    ok(db, clock, "run", "--max-ticks", "1")  # notice
    m = only_migration(db)
    assert m.state is S.NOTIFIED
    clock.advance(5)
    # A worker in this process drives it (the CLI's ``run`` would release it when it exits).
    store = Store.open(db, clock=clock)
    sync = MetadataSync(store, default_client_factory(attempts=1, sleep=lambda s: None))
    step = executor_step(
        store, EngineConfig(), driver="sim", hooks=sync, monotonic=lambda: wall(clock), sim_speed=5
    )
    assert isinstance(step, SimTickStep)
    for _ in range(4):
        clock.advance(1)
        step.tick()
    assert store.get_migration(m.id).state is S.RUNNING
    status = ok(db, clock, "status").output
    [row] = [line for line in status.splitlines() if m.id in line]
    assert "running" in row and "disk" in row and " %" in row and "ETA" in row, status

    r = ok(db, clock, "abort", m.id)
    assert "abort requested" in r.output and "keeps running on hv1" in r.output
    assert "(abort requested)" in ok(db, clock, "status").output
    for _ in range(30):
        clock.advance(1)
        step.tick()
        if store.get_migration(m.id).state is S.CANCELLED:
            break
    assert store.get_migration(m.id).state is S.CANCELLED
    assert store.get_droplet("big").host == "hv1"
    world = step.world
    assert world.hosts_holding("big") == ["hv1"]  # target cleaned
    d = world.droplets["big"]
    assert (d.host, d.state, d.throttle_pct, d.disk_limit_bps) == ("hv1", DomainState.RUNNING, 0, None)
    sync.close()
    store.close()
    assert admin.event("big") is None  # the guest's flag cleared


# ---- run ---------------------------------------------------------------------------------------------------


def test_run_executes_a_due_migration_then_releases_a_running_one_when_it_stops(
    db: str, clock: FakeClock, admin: FakeAdmin
) -> None:
    ok(
        db,
        clock,
        "migrate",
        "web1",
        "--to",
        "hv2",
        "--start",
        "+3s",
        "--notice",
        "3s",
        "--unsafe-short-notice",
    )
    ok(
        db,
        clock,
        "migrate",
        "big",
        "--to",
        "hv3",
        "--start",
        "+3s",
        "--notice",
        "3s",
        "--unsafe-short-notice",
    )
    # 20 ticks of 1 s: web1 (5 GiB) completes; big (204 GiB) is still copying when the loop stops.
    ok(db, clock, "run", "--max-ticks", "20", "--poll-interval", "1s", "--sim-speed", "2")
    store = Store.open(db, clock=clock)
    by_droplet = {m.droplet_id: m for m in store.list_migrations()}
    assert by_droplet["web1"].state is S.COMPLETED
    assert store.get_droplet("web1").host == "hv2"
    assert admin.event("web1") is None
    # Released at once (not left to the claim lease): back on the retry path, source untouched.
    big = by_droplet["big"]
    assert big.state is S.NOTIFIED and big.claimed_by is None and big.attempt == 1
    assert store.get_droplet("big").host == "hv1"
    world = load_world(store)
    store.close()
    assert world is not None
    assert world.hosts_holding("big") == ["hv1"] and world.hosts_holding("web1") == ["hv2"]
    assert world.droplets["big"].state is DomainState.RUNNING
