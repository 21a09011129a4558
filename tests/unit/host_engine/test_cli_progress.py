"""Following migrations: ``status --watch`` (terminal, pipe, ``--json``), ``migrate --now --json`` as a stream
and ``report --plot``. On SQLite with the simulated hypervisor; the watch's sleep advances the fake clock and
ticks a worker in this process, so each refresh sees the migration move on and nothing sleeps."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from host_engine import progress as progress_text
from host_engine.config import EngineConfig
from host_engine.engine_steps import SimTickStep, executor_step
from host_engine.executor import PROGRESS_KEY
from host_engine.metadata.reconcile import MetadataSync, default_client_factory
from host_engine.plot import plot_timeline, time_axis_s
from host_engine.states import LogKind, MigrationState
from host_engine.store import Store
from tests.unit.host_engine.cli_run import invoke, ok, one_error
from tests.unit.host_engine.conftest import GIB, T0, FakeClock, wall
from tests.unit.host_engine.fake_admin import FakeAdmin

CLEAR = "\033[H\033[2J"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Worker:
    """A worker in this process driving the sim; ``sleep`` is what the watch waits with."""

    def __init__(self, db: str, clock: FakeClock) -> None:
        self.clock = clock
        self.store = Store.open(db, clock=clock)
        self.sync = MetadataSync(self.store, default_client_factory(attempts=1, sleep=lambda s: None))
        step = executor_step(
            self.store,
            EngineConfig(),
            driver="sim",
            hooks=self.sync,
            monotonic=lambda: wall(clock),
            sim_speed=1,
        )
        assert isinstance(step, SimTickStep)
        self.step = step
        self.slept_s: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.slept_s.append(seconds)
        self.clock.advance(seconds)
        self.step.tick()

    def close(self) -> None:
        self.sync.close()
        self.store.close()


@pytest.fixture
def running(db: str, clock: FakeClock, admin: FakeAdmin) -> Callable[[str, str], Worker]:
    """Plan DROPLET -> TARGET with a 3 s notice, send it, open the window and start the worker on it."""
    workers: list[Worker] = []

    def start(droplet: str, target: str) -> Worker:
        ok(db, clock, "migrate", droplet, "--to", target, "--start", "+3s", "--notice", "3s",
           "--unsafe-short-notice")  # fmt: skip
        ok(db, clock, "run", "--max-ticks", "1")  # the notice
        clock.advance(3)
        worker = Worker(db, clock)
        workers.append(worker)
        worker.sleep(1)
        [m] = [m for m in worker.store.list_migrations() if m.droplet_id == droplet]
        assert m.state is MigrationState.RUNNING
        return worker

    yield start  # type: ignore[misc]
    for w in workers:
        w.close()


def snapshots(output: str) -> list[str]:
    return [s for s in output.strip("\n").split("\n\n") if s.strip()]


# ---- status --watch ----------------------------------------------------------------------------------------


def test_watch_redraws_with_live_progress_until_no_migration_is_active(
    db: str, clock: FakeClock, running: Callable[[str, str], Worker]
) -> None:
    worker = running("web1", "hv2")
    r = ok(db, clock, "status", "--watch", "--interval", "1", sleep=worker.sleep)
    shots = snapshots(r.output)
    assert CLEAR not in r.output  # not a terminal: snapshots one after the other
    assert len(shots) == len(worker.slept_s) - 1 + 1 >= 2  # one refresh per wait, plus the first
    first = shots[0].splitlines()
    assert first[0].endswith("1 active migration(s)") and "Ctrl-C" not in first[0]
    for column in ("PHASE", "ROUND", "DONE", "REMAINING", "RATE", "THROTTLE", "ETA"):
        assert column in first[1]
    [row] = [line for line in first[2:] if "web1" in line]
    assert "running" in row and "hv1 -> hv2" in row and " %" in row and "MiB/s" in row
    # It stops by itself once the migration is over, the last refresh showing how it ended.
    last = shots[-1].splitlines()
    assert last[0].endswith("0 active migration(s)")
    [row] = [line for line in last[2:] if "web1" in line]
    assert "completed" in row and "done" in row
    assert worker.store.get_droplet("web1").host == "hv2"


def test_watch_on_a_terminal_redraws_in_place_and_count_bounds_it(
    db: str, clock: FakeClock, running: Callable[[str, str], Worker]
) -> None:
    worker = running("big", "hv3")
    r = ok(db, clock, "status", "--watch", "--count", "3", sleep=worker.sleep, tty=True)
    assert r.output.count(CLEAR) == 3 and r.output.startswith(CLEAR)
    assert worker.slept_s[1:] == [2.0, 2.0]  # the default interval, between the three refreshes
    last = r.output.rsplit(CLEAR, 1)[1]
    assert "every 2s (Ctrl-C to stop)" in last.splitlines()[0]
    [row] = [line for line in last.splitlines() if "big" in line]
    assert "disk" in row and "running" in row


def test_watch_json_is_one_document_per_refresh(
    db: str, clock: FakeClock, running: Callable[[str, str], Worker]
) -> None:
    worker = running("big", "hv3")
    r = ok(
        db, clock, "status", "--watch", "--json", "--count", "2", "--interval", "1500ms", sleep=worker.sleep
    )
    docs = [json.loads(line) for line in r.output.splitlines()]
    assert len(docs) == 2 and worker.slept_s[1:] == [1.5]
    assert [d["active"] for d in docs] == [1, 1]
    [m] = docs[-1]["migrations"]
    assert m["state"] == "running" and m["droplet"] == "big"
    assert m["stats"]["progress"]["phase"] == "disk"
    assert docs[1]["at"] > docs[0]["at"]


def test_watch_ends_quietly_on_ctrl_c_and_with_nothing_active(
    db: str, clock: FakeClock, running: Callable[[str, str], Worker]
) -> None:
    running("big", "hv3")

    def interrupted(_seconds: float) -> None:
        raise KeyboardInterrupt

    r = ok(db, clock, "status", "--watch", sleep=interrupted)
    assert len(snapshots(r.output)) == 1 and "big" in r.output
    r = ok(db, clock, "status", "--watch", "--host", "hv2")  # nothing out of hv2: one refresh, exit 0
    assert r.output.strip().endswith("0 active migration(s)")


WATCH_BAD = [
    ("count without watch", ["status", "--count", "2"], 2, "--interval and --count go with --watch"),
    ("interval without watch", ["status", "--interval", "1s"], 2, "go with --watch"),
    ("zero interval", ["status", "--watch", "--interval", "0"], 2, "--interval must be positive"),
    ("bad interval", ["status", "--watch", "--interval", "soon"], 2, "malformed duration"),
    ("zero count", ["status", "--watch", "--count", "0"], 2, "'--count'"),
    ("unknown host", ["status", "--watch", "--host", "hv9"], 3, "hv9"),
]


@pytest.mark.parametrize(("what", "args", "code", "message"), WATCH_BAD, ids=[b[0] for b in WATCH_BAD])
def test_bad_watch_flags_are_one_line(
    db: str, clock: FakeClock, what: str, args: list[str], code: int, message: str
) -> None:
    one_error(invoke(db, clock, *args), code, message)


@pytest.mark.parametrize(
    ("eta_s", "shown"),
    [(9.4e13, "> 1 day"), (float("inf"), "> 1 day"), (float("nan"), "unknown"), (-3.0, "unknown")],
)
def test_status_watch_and_report_show_any_recorded_eta(
    db: str, clock: FakeClock, running: Callable[[str, str], Worker], eta_s: float, shown: str
) -> None:
    """Issue 13.3: a recorded ETA of 9.4e13 s (a rate barely above the dirty rate) crashed the CLI with an
    OverflowError; whatever number was recorded, every view shows it and exits 0."""
    worker = running("web1", "hv2")
    [m] = worker.store.list_migrations()
    p = {**m.stats[PROGRESS_KEY], "eta_s": eta_s, "downtime_ms": None, "phase": "disk"}  # type: ignore[dict-item]
    worker.store.update_migration(m.id, stats={**m.stats, PROGRESS_KEY: p})
    worker.store.append_log(m.id, LogKind.PROGRESS, "disk", data=p)

    assert f"ETA {shown}" in ok(db, clock, "status").output
    assert shown in ok(db, clock, "status", "--watch", "--count", "1").output
    assert shown in ok(db, clock, "report", m.id).output
    # --json stays standard JSON (no NaN / Infinity, which jq and strict parsers refuse): such a number is null.
    [listed] = strict_json(ok(db, clock, "status", "--json").stdout)
    watched = strict_json(ok(db, clock, "status", "--watch", "--count", "1", "--json").stdout)
    reported = strict_json(ok(db, clock, "report", m.id, "--json").stdout)
    expected = eta_s if math.isfinite(eta_s) else None
    assert listed["stats"][PROGRESS_KEY]["eta_s"] == expected
    assert watched["migrations"][0]["stats"][PROGRESS_KEY]["eta_s"] == expected
    assert reported["timeline"][-1]["eta_s"] == expected


def strict_json(text: str) -> Any:
    def refuse(constant: str) -> None:
        raise AssertionError(f"not standard JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


_RECORDED_KEYS = [
    "phase", "round", "elapsed_s", "eta_s", "downtime_ms", "transfer_rate_bps", "disk_write_limit_bps",
    "memory_throttle_pct", "disk_total_bytes", "disk_remaining_bytes", "memory_total_bytes",
    "memory_remaining_bytes",
]  # fmt: skip
_ANY_NUMBER = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.sampled_from([10**400, -(10**400)]),  # past what a float holds
    st.none(),
    st.booleans(),
    st.text(max_size=5),
)


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_eta_text_is_short_for_any_float(eta_s: float) -> None:
    text = progress_text.eta_text(eta_s)
    assert text and len(text) <= 10, text
    if not 0 <= eta_s <= progress_text.ETA_SHOWN_UP_TO_S:  # nan fails both comparisons
        assert text in (progress_text.ETA_BEYOND, progress_text.ETA_UNKNOWN)


@given(st.dictionaries(st.sampled_from(_RECORDED_KEYS), _ANY_NUMBER))
def test_progress_views_never_raise_on_any_recorded_values(p: dict[str, object]) -> None:
    """What the executor recorded is data from a store: every view renders it, whatever it holds."""
    for line in (progress_text.summary(p), progress_text.short(p), progress_text.format_eta(p)):
        assert isinstance(line, str) and "\n" not in line
    assert len(progress_text.live_row(p)) == len(progress_text.LIVE_HEADERS)
    assert len(progress_text.timeline_row(p)) == len(progress_text.TIMELINE_HEADERS)
    pct = progress_text.percent_done(p)
    assert pct is None or 0.0 <= pct <= 100.0


# ---- migrate --now --json ----------------------------------------------------------------------------------


def test_migrate_now_json_streams_one_object_per_line_ending_with_the_result(
    db: str, clock: FakeClock, admin: FakeAdmin
) -> None:
    r = ok(db, clock, "migrate", "web1", "--to", "hv2", "--now", "--unsafe-short-notice", "--json")
    docs = [json.loads(line) for line in r.output.splitlines()]
    types = [d["type"] for d in docs]
    assert types[:2] == ["planned", "notified"] and types[-1] == "result"
    progress = [d for d in docs if d["type"] == "progress"]
    assert len(progress) >= 2
    assert {
        "phase",
        "round",
        "disk_remaining_bytes",
        "transfer_rate_bps",
        "memory_throttle_pct",
        "eta_s",
    } <= set(progress[0])
    assert all(d["migration"] == docs[-1]["id"] for d in docs)  # every line, the result too (docs)
    assert progress[-1]["phase"] == "done"
    result = docs[-1]
    assert result["state"] == "completed" and result["target"] == "hv2" and result["timeline"]


# ---- report --plot -----------------------------------------------------------------------------------------


@pytest.fixture
def completed(db: str, clock: FakeClock, admin: FakeAdmin) -> str:
    r = ok(db, clock, "migrate", "web1", "--to", "hv2", "--now", "--unsafe-short-notice", "--json")
    return str(json.loads(r.output.splitlines()[-1])["id"])


def test_report_plot_writes_a_png(db: str, clock: FakeClock, completed: str, tmp_path: Path) -> None:
    out = tmp_path / "web1.png"
    r = ok(db, clock, "report", completed, "--plot", str(out))
    assert f"plot written to {out}" in r.output and "REMAINING" in r.output
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    # With --json, stdout stays one JSON document.
    r = ok(db, clock, "report", completed, "--json", "--plot", str(tmp_path / "again.png"))
    assert json.loads(r.stdout)["migration"]["id"] == completed and "plot written" in r.stderr
    assert (tmp_path / "again.png").read_bytes().startswith(PNG_MAGIC)


def test_report_plot_without_matplotlib_is_one_line(
    db: str, clock: FakeClock, completed: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "x.png"
    r = invoke(db, clock, "report", completed, "--plot", str(out))
    one_error(r, 6, "pip install 'droplet-live-migration[plot]'")
    assert not out.exists()


def test_report_plot_refuses_an_unwritable_path_or_no_progress(
    db: str, clock: FakeClock, completed: str, tmp_path: Path
) -> None:
    one_error(
        invoke(db, clock, "report", completed, "--plot", str(tmp_path / "no" / "such" / "x.png")),
        2,
        "cannot write the plot",
    )
    planned = ok(db, clock, "migrate", "big", "--start", "+1h", "--unsafe-short-notice", "--json")
    [mid] = json.loads(planned.output)["migrations"]
    one_error(invoke(db, clock, "report", mid, "--plot", str(tmp_path / "y.png")), 2, "nothing to plot")


def test_plot_time_axis_places_a_retry_after_the_first_attempt() -> None:
    rows: list[dict[str, object]] = [
        {"attempt": 1, "elapsed_s": 0.0, "at": "2026-12-01T00:00:00+00:00"},
        {"attempt": 1, "elapsed_s": 4.0, "at": "2026-12-01T00:00:04+00:00"},
        {"attempt": 2, "elapsed_s": 1.0, "at": "2026-12-01T00:01:01+00:00"},
        {"attempt": 2, "elapsed_s": 3.0, "at": "2026-12-01T00:01:01+00:00"},
    ]
    assert time_axis_s(rows) == ([0.0, 4.0, 61.0, 63.0], [0.0, 60.0])
    # A clock that went backwards never puts an attempt before the end of the previous one.
    rows[2]["at"] = rows[3]["at"] = "2026-12-01T00:00:01+00:00"
    assert time_axis_s(rows)[1] == [0.0, 4.0]


def test_plot_draws_throttle_and_a_disk_limit_across_a_retry(tmp_path: Path) -> None:
    rows: list[dict[str, object]] = []
    for attempt, start_s in ((1, 0), (2, 120)):
        for i in range(0, 60, 5):
            at = T0 + timedelta(seconds=start_s + i)
            rows.append(
                {"attempt": attempt, "at": at.isoformat(), "elapsed_s": float(i), "phase": "disk",
                 "disk_remaining_bytes": max(0, 20 * GIB - i * GIB // 2), "memory_remaining_bytes": 2 * GIB,
                 "memory_throttle_pct": 20 if i >= 40 else 0,
                 "disk_write_limit_bps": 64 * 1024 * 1024 if 30 <= i < 50 else None}
            )  # fmt: skip
    out = plot_timeline(rows, tmp_path / "retry.png", title="m-1: db1 hv1 -> hv2, completed")
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
