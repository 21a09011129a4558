"""``host-engine migrate --now``: notify at once, then drive that one migration in this process until it ends,
printing its progress (lines for people, or one JSON object per line with ``--json``).

The engine is the one ``host-engine run`` builds (:func:`host_engine.wiring.build_engine`), restricted to this
migration; SIGINT/SIGTERM stop the attempt cleanly, its source untouched, and ``run`` retries it later.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

import click

from host_engine import progress as progress_text
from host_engine.cli.app import Deps, _client_factory, _entry_doc, _json_line, _migration_doc
from host_engine.errors import MigrationIncomplete, TransientError
from host_engine.executor import LAST_ATTEMPT_KEY, PROGRESS_KEY, timeline
from host_engine.models import LogEntry, Migration
from host_engine.states import LogKind, MigrationState
from host_engine.store import Store
from host_engine.timeparse import Clock, format_time
from host_engine.wiring import WiredEngine, build_engine


def run_now(deps: Deps, planned: Migration, driver: str, sim_speed: float, as_json: bool) -> None:
    """``migrate --now``: notify at once, then drive this one migration here until it ends."""
    store = deps.store()
    mid = planned.id
    out = _NowReport(mid, as_json, deps.clock)
    out.say(
        f"migration {mid}: {planned.droplet_id} {planned.source_host} -> {planned.target_host}, planned",
        {"type": "planned", "droplet": planned.droplet_id, "source": planned.source_host,
         "target": planned.target_host},
    )  # fmt: skip
    sleep = deps.sleep or time.sleep
    with build_engine(
        store,
        deps.config,
        driver,
        deps.clock,
        clients=deps.client_factory or _client_factory(deps),
        sim_speed=sim_speed,
        monotonic=deps.monotonic or time.monotonic,
        only=[mid],
        sleep=sleep,
    ) as wired:
        m, errors = _notify(wired, store, mid, deps.monotonic or time.monotonic, sleep)
        if m.state is MigrationState.PLANNED:
            why = next((e for e in errors if e.startswith(f"{mid}:")), "not due yet")
            raise TransientError(
                f"migration {mid} is planned but its notice could not be sent ({why}); "
                "host-engine run retries it, host-engine cancel drops it"
            )
        out.say(
            f"migration {mid}: notice sent (event {m.event_id}), window opens {format_time(m.not_before)}",
            {"type": "notified", "event_id": m.event_id, "not_before": format_time(m.not_before)},
        )
        try:
            m = _drive_one(deps, wired, mid, out, sleep)
        except MigrationIncomplete:  # interrupted: machines still get where it was left
            out.result(store.get_migration(mid), timeline(store, mid))
            raise
    last = m.stats.get(LAST_ATTEMPT_KEY) or {}
    out.result(m, timeline(store, mid))
    if m.state is MigrationState.COMPLETED:
        downtime = last.get("downtime_ms") if isinstance(last, dict) else None
        out.say(
            f"migration {mid} completed: {m.droplet_id} now runs on {m.target_host}"
            + (f" (downtime {float(downtime):.0f} ms)" if isinstance(downtime, int | float) else ""),
            None,
        )
        return
    raise MigrationIncomplete(
        f"migration {mid} ended {m.state.value}"
        + (f" after attempt {m.attempt}: {m.last_error}" if m.last_error else "")
        + ("; an offline migration is scheduled" if m.state is MigrationState.OFFLINE_REQUIRED else "")
    )


# A ``host-engine run`` worker may claim the new migration's notice before this process does (it is due at
# once): its send is given this long (wall seconds) to end, then this process follows the migration.
NOTICE_HANDOFF_S = 15.0
_HANDOFF_POLL_S = 0.1


def _notify(
    wired: WiredEngine, store: Store, mid: str, wall: Callable[[], float], sleep: Callable[[float], None]
) -> tuple[Migration, list[str]]:
    """Send ``mid``'s notice here, or let a worker that claimed it first finish sending it.

    Returns the migration as it then is (still ``planned`` only if no one could send it) and this process's
    errors for it."""
    until = wall() + NOTICE_HANDOFF_S
    polls = int(NOTICE_HANDOFF_S / _HANDOFF_POLL_S)  # a bound in count too, whatever the clock does
    while True:
        _sent, errors = wired.engine.send_due_notices()
        errors = [e for e in errors if e.startswith(f"{mid}:")]
        m = store.get_migration(mid)
        if m.state is not MigrationState.PLANNED or errors or wall() >= until or polls <= 0:
            return m, errors
        while m.state is MigrationState.PLANNED and m.claimed_by is not None and wall() < until and polls > 0:
            sleep(_HANDOFF_POLL_S)  # another worker is sending it (or gives its claim back on failure)
            polls -= 1
            m = store.get_migration(mid)
        if m.state is not MigrationState.PLANNED:
            return m, []
        polls -= 1


# ``migrate --now`` prints every logged change (phase, round, throttle) and, between them, the latest recorded
# progress at most this often: a long disk copy still shows its percent and ETA moving.
NOW_PROGRESS_EVERY_S = 5.0

# The states that end ``migrate --now``: done, given up on live (offline_required), or stuck failed.
_NOW_ENDS = frozenset(
    {
        MigrationState.COMPLETED,
        MigrationState.CANCELLED,
        MigrationState.OFFLINE_REQUIRED,
        MigrationState.FAILED,
    }
)


class _NowReport:
    """Where ``migrate --now`` reports: lines for people or, with ``--json``, one JSON object per line (its
    ``type``: ``planned``, ``notified``, ``log``, ``progress``, then one ``result``)."""

    def __init__(self, migration_id: str, as_json: bool, clock: Clock) -> None:
        self.migration_id = migration_id
        self.as_json = as_json
        self.clock = clock

    def say(self, text: str, doc: dict[str, object] | None) -> None:
        """``text`` for people; ``doc`` (None: nothing) for machines."""
        if not self.as_json:
            click.echo(text)
        elif doc is not None:
            _json_line({"migration": self.migration_id, **doc})

    def entry(self, e: LogEntry) -> None:
        if e.kind == LogKind.PROGRESS and e.data:
            self.progress(e.data, at=e.at)
        else:
            self.say(f"  {e.message}", {"type": "log", **_entry_doc(e)})

    def progress(self, p: Mapping[str, object], *, at: datetime | None = None) -> None:
        line = progress_text.summary(p)
        when = format_time(at or self.clock())
        self.say(f"  {line}", {"type": "progress", "at": when, "summary": line, **p})

    def result(self, m: Migration, rows: list[dict[str, object]]) -> None:
        if self.as_json:
            _json_line(
                {"type": "result", "migration": m.id, **_migration_doc(m, self.clock()), "timeline": rows}
            )


def _drive_one(
    deps: Deps,
    wired: WiredEngine,
    mid: str,
    out: _NowReport,
    sleep: Callable[[float], None],
) -> Migration:
    """Tick ``step`` until migration ``mid`` ends, echoing its log (progress lines with percent and ETA).

    SIGINT/SIGTERM stop the attempt cleanly (source untouched; it goes back to the retry path)."""
    step = wired.step
    store = step.store
    stop = threading.Event()
    restore = _catch_stop_signals(stop) if deps.install_signals else {}
    seen = len(store.migration_log(mid))
    wall = deps.monotonic or time.monotonic
    last_said_s, last_shown = wall(), None
    try:
        while True:
            step.tick()
            for entry in store.migration_log(mid)[seen:]:
                seen += 1
                out.entry(entry)
                last_said_s, last_shown = wall(), entry.data.get("elapsed_s", last_shown)
            m = store.get_migration(mid)
            p = m.stats.get(PROGRESS_KEY)
            if (
                isinstance(p, dict)
                and m.state.is_active
                and p.get("elapsed_s") != last_shown
                and wall() - last_said_s >= NOW_PROGRESS_EVERY_S
            ):
                out.progress(p)
                last_said_s, last_shown = wall(), p.get("elapsed_s")
            if m.state in _NOW_ENDS:
                return m
            if stop.is_set():
                break
            step.wait(deps.config.engine.poll_interval_s, sleep)  # an attempt's end wakes it
    finally:
        for signum, handler in restore.items():
            signal.signal(signum, handler)
        wired.shutdown()
    m = store.get_migration(mid)
    raise MigrationIncomplete(
        f"interrupted: migration {mid} is {m.state.value}, {m.droplet_id} still on {m.source_host}"
        + (f"; retried from {format_time(m.not_before)} by host-engine run" if m.state.is_active else "")
    )


def _catch_stop_signals(stop: threading.Event) -> dict[int, Any]:
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous: dict[int, Any] = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous[signum] = signal.signal(signum, lambda _s, _f: stop.set())
    return previous
