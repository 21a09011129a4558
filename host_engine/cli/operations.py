"""``host-engine run|status|abort|force-complete|report|history``: the engine process and what it did."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timedelta

import click

from guest_sdk.daemon_logging import LogFormat, log_format_option, setup_logging
from host_engine import expectation
from host_engine import progress as progress_text
from host_engine import requests as operator_requests
from host_engine.cli.app import (
    Deps,
    _client_factory,
    _entry_doc,
    _json,
    _json_line,
    _migration_doc,
    _table,
    cli,
    pass_deps,
)
from host_engine.cli.planning import _driver_option, _sim_speed_option
from host_engine.engine_metrics import EngineMetrics, Readiness
from host_engine.errors import (
    HostEngineError,
    InvalidInput,
)
from host_engine.executor import (
    ABORT_REQUEST_KEY,
    LAST_ATTEMPT_KEY,
    PROGRESS_KEY,
    request_abort,
)
from host_engine.executor_metrics import ExecutorMetrics
from host_engine.lab.demo import demo as demo_command
from host_engine.metadata.probe import ServerProbe
from host_engine.metadata.reconcile import MetadataSync
from host_engine.metrics_http import parse_listen, serve_metrics
from host_engine.models import LogEntry, Migration
from host_engine.plot import plot_timeline
from host_engine.states import ACTIVE_STATES, MigrationState
from host_engine.store import Store
from host_engine.timeline import attempt_marks, timeline
from host_engine.timeparse import format_duration, format_time, parse_duration
from host_engine.wiring import build_engine
from host_engine.workers import WorkerName

log = logging.getLogger(__name__)


# ---- status / history ------------------------------------------------------------------------------------


# ``status --watch`` redraws this often by default: the executor records progress every 5 s, so a faster
# refresh mostly redraws the same numbers, and a slower one hides a short memory phase.
WATCH_INTERVAL = "2s"
# Cursor home + erase display (ANSI): what ``clear`` does, without a subprocess.
_CLEAR_SCREEN = "\033[H\033[2J"


@cli.command()
@click.option("--host", "host_name", default=None)
@click.option("--all", "show_all", is_flag=True, help="Include completed and cancelled migrations.")
@click.option(
    "--json", "as_json", is_flag=True, help="JSON (with --watch: one document per line per refresh)."
)
@click.option(
    "--watch",
    is_flag=True,
    help="Redraw with live progress every --interval until no migration is active (Ctrl-C stops).",
)
@click.option("--interval", default=None, help=f"--watch: time between refreshes (default {WATCH_INTERVAL}).")
@click.option("--count", type=click.IntRange(min=1), default=None, help="--watch: stop after N refreshes.")
@pass_deps
def status(
    deps: Deps,
    host_name: str | None,
    show_all: bool,
    as_json: bool,
    watch: bool,
    interval: str | None,
    count: int | None,
) -> None:
    """Migrations: state, source -> target, time to their window (--watch: live progress)."""
    if not watch and (interval is not None or count is not None):
        raise InvalidInput("--interval and --count go with --watch", field="watch")
    interval_s = parse_duration(interval or WATCH_INTERVAL, field="--interval").total_seconds()
    if interval_s <= 0:
        raise InvalidInput("--interval must be positive", field="interval")
    store = deps.store()
    if host_name is not None:
        store.get_host(host_name)
    if watch:
        _watch_status(deps, store, host_name, show_all, as_json, interval_s, count)
        return
    ms = store.list_migrations(host=host_name, states=None if show_all else ACTIVE_STATES)
    now = deps.clock()
    if as_json:
        _json([_migration_doc(m, now) for m in ms])
        return
    if not ms:
        click.echo("no migrations" if show_all else "no active migrations")
        return
    rows = [
        [m.id, m.droplet_id, m.state.value + _cap(m), f"{m.source_host} -> {m.target_host}",
         format_time(m.not_before),
         _window(m, now), f"{m.attempt}/{m.max_attempts}", _progress_cell(m)]
        for m in ms
    ]  # fmt: skip
    headers = ["MIGRATION", "DROPLET", "STATE", "MOVE", "NOT_BEFORE", "WINDOW", "ATTEMPT", "PROGRESS"]
    click.echo(_table(headers, rows))


def _watch_status(
    deps: Deps,
    store: Store,
    host_name: str | None,
    show_all: bool,
    as_json: bool,
    interval_s: float,
    count: int | None,
) -> None:
    """``status --watch``: one refresh every ``interval_s`` until no migration is active, ``count`` refreshes,
    or Ctrl-C. On a terminal each refresh replaces the last; otherwise snapshots follow each other, separated
    by a blank line (``--json``: one document per line). A migration that ends during the watch stays in it
    with its final state, so the last refresh says how each one ended."""
    sleep = deps.sleep or time.sleep
    tty = deps.tty if deps.tty is not None else sys.stdout.isatty()
    refreshes = 0
    watched: dict[str, None] = {}  # ids seen so far, in order
    try:
        while True:
            ms = store.list_migrations(host=host_name, states=None if show_all else ACTIVE_STATES)
            listed = {m.id for m in ms}
            ms += [store.get_migration(mid) for mid in watched if mid not in listed]
            watched.update(dict.fromkeys(m.id for m in ms))
            now = deps.clock()
            active = sum(1 for m in ms if m.state.is_active)
            refreshes += 1
            if as_json:
                doc = {
                    "at": format_time(now),
                    "active": active,
                    "migrations": [_migration_doc(m, now) for m in ms],
                }
                _json_line(doc)
            else:
                frame = _watch_frame(ms, now, active, interval_s, tty=tty)
                if tty:
                    click.echo(_CLEAR_SCREEN, nl=False, color=True)  # click strips ANSI codes unless told
                elif refreshes > 1:
                    click.echo()
                click.echo(frame)
            if not active or (count is not None and refreshes >= count):
                return
            sleep(interval_s)
    except KeyboardInterrupt:  # Ctrl-C is how a watch is meant to end
        if tty and not as_json:
            click.echo()


def _watch_frame(ms: Sequence[Migration], now: datetime, active: int, interval_s: float, *, tty: bool) -> str:
    every = (
        format_duration(timedelta(seconds=interval_s)) if interval_s >= 1 else f"{interval_s * 1000:.0f}ms"
    )
    header = f"{format_time(now)}  {active} active migration(s)"
    if tty:
        header += f", every {every} (Ctrl-C to stop)"
    if not ms:
        return header
    rows = []
    for m in ms:
        p = m.stats.get(PROGRESS_KEY)
        running = m.state in (MigrationState.RUNNING, MigrationState.OFFLINE_RUNNING) and isinstance(p, dict)
        state = m.state.value + _requested(m)
        cells = (
            progress_text.live_row(p)
            if running and isinstance(p, dict)
            else [None] * len(progress_text.LIVE_HEADERS)
        )
        rows.append(
            [m.id, m.droplet_id, state, f"{m.source_host} -> {m.target_host}", _window(m, now),
             f"{m.attempt}/{m.max_attempts}", *cells]
        )  # fmt: skip
    headers = ["MIGRATION", "DROPLET", "STATE", "MOVE", "WINDOW", "ATTEMPT", *progress_text.LIVE_HEADERS]
    return header + "\n" + _table(headers, rows)


def _progress_cell(m: Migration) -> str | None:
    """A running migration's last recorded progress: phase, percent, ETA."""
    p = m.stats.get(PROGRESS_KEY)
    if m.state not in (MigrationState.RUNNING, MigrationState.OFFLINE_RUNNING) or not isinstance(p, dict):
        return None
    asked = _requested(m, cap=False)
    return progress_text.short(p) + (f" ({asked[2:]})" if asked else "")


def _cap(m: Migration) -> str:
    mibps = operator_requests.bandwidth_mibps(m.stats)
    return f", cap {mibps}MiB/s" if mibps is not None else ""


def _requested(m: Migration, *, cap: bool = True) -> str:
    """What an operator asked of a migration (abort, force-complete) and its own bandwidth cap, as a
    suffix for the state: ", abort requested, cap 200MiB/s"."""
    notes = []
    if m.stats.get(ABORT_REQUEST_KEY):
        notes.append("abort requested")
    if operator_requests.forced_now(m) is not None and m.state.is_active:
        notes.append("force-complete requested")
    mibps = operator_requests.bandwidth_mibps(m.stats)
    if cap and mibps is not None:
        notes.append(f"cap {mibps}MiB/s")
    return "".join(f", {n}" for n in notes)


@cli.command()
@click.argument("migration_id")
@click.option("--by", "by", default=None, help="Who asks (default: the login name).")
@pass_deps
def abort(deps: Deps, migration_id: str, by: str | None) -> None:
    """Stop a migration: a running one is aborted by its worker (source untouched), then cancelled."""
    store = deps.store()
    m = request_abort(store, migration_id, by=deps.requested_by(by))
    if m.state is MigrationState.CANCELLED:
        click.echo(f"{m.id} ({m.droplet_id}) cancelled; it had not started")
        if m.notified_at is not None:
            with MetadataSync(store, deps.client_factory or _client_factory(deps)) as sync:
                try:
                    sync.clear(m)
                except HostEngineError as e:
                    click.echo(f"{m.id}: event not cleared yet ({e}); the engine will retry", err=True)
        return
    click.echo(
        f"{m.id} ({m.droplet_id}): abort requested; its worker stops the attempt within seconds, "
        f"{m.droplet_id} keeps running on {m.source_host}, then the migration is cancelled "
        "(follow with host-engine status)"
    )


@cli.command("force-complete")
@click.argument("migration_id")
@click.option("--reason", required=True, help="Why the extra downtime is accepted: logged, shown in report.")
@click.option("--by", "by", default=None, help="Who asks (default: the login name).")
@pass_deps
def force_complete(deps: Deps, migration_id: str, reason: str, by: str | None) -> None:
    """Switch a running live migration over now, accepting more downtime than the budget."""
    m = operator_requests.request_force_complete(
        deps.store(), migration_id, by=deps.requested_by(by), reason=reason
    )
    p = m.stats.get(PROGRESS_KEY)
    in_disk = isinstance(p, dict) and p.get("phase") in ("preparing", "disk")
    click.echo(
        f"{m.id} ({m.droplet_id}): force-complete requested; its worker switches over within seconds"
        + (
            " once the disk mirror is in sync (disk writes held at the slowest limit meanwhile)"
            if in_disk
            else ""
        )
        + f", pausing {m.droplet_id} for as long as the rest takes (follow with host-engine status)"
    )


@cli.command()
@click.argument("migration_id")
@click.option("--json", "as_json", is_flag=True)
@click.option(
    "--plot",
    "plot_path",
    default=None,
    metavar="FILE.png",
    help="Also draw remaining bytes and throttle over time into a PNG (needs the 'plot' extra).",
)
@pass_deps
def report(deps: Deps, migration_id: str, as_json: bool, plot_path: str | None) -> None:
    """A migration's recorded progress over time: phase, round, remaining, rate, throttle, ETA."""
    store = deps.store()
    m = store.get_migration(migration_id)
    rows = timeline(store, migration_id)
    last = m.stats.get(LAST_ATTEMPT_KEY)
    marks = attempt_marks(store.migration_log(migration_id), rows, last if isinstance(last, dict) else None)
    if plot_path is not None:
        title = f"{m.id}: {m.droplet_id} {m.source_host} -> {m.target_host}, {m.state.value}"
        written = plot_timeline(rows, plot_path, title=title, marks=marks)
        click.echo(f"plot written to {written}", err=as_json)
    if as_json:
        attempts = [dataclasses.asdict(mark) for mark in marks]
        p, a = expectation.predicted(m.stats), expectation.actual(m)
        _json(
            {
                "migration": _migration_doc(m, deps.clock()),
                "timeline": rows,
                "attempts": attempts,
                "predicted": None if p is None else p.to_json(),
                "actual": None if a is None else a.to_json(),
            }
        )
        return
    click.echo(
        f"{m.id}: {m.droplet_id} {m.source_host} -> {m.target_host}, {m.state.value}, "
        f"attempt {m.attempt}/{m.max_attempts}"
    )
    cap = operator_requests.bandwidth_mibps(m.stats)
    if cap is not None:
        click.echo(f"bandwidth cap: {cap}MiB/s")
    forced = operator_requests.force_complete(m.stats)
    if forced is not None:
        click.echo(f"{forced.describe()} at {format_time(forced.at)} (attempt {forced.attempt})")
    compared = expectation.compare_line(m)
    if compared is not None:
        click.echo(compared)
    if isinstance(last, dict):
        click.echo("last attempt: " + ", ".join(f"{k} {v}" for k, v in last.items() if v is not None))
    for mark in marks:
        click.echo(mark.describe())
    if not rows:
        click.echo("no progress recorded yet")
        return
    # Each change of phase, round, throttle or limit; --json and --plot have every sample in between.
    changes = timeline(store, migration_id, dense=False)
    click.echo(_table(progress_text.TIMELINE_HEADERS, [progress_text.timeline_row(r) for r in changes]))
    if len(rows) > len(changes):
        click.echo(f"{len(rows)} samples in all: report --json lists them, report --plot draws them")


def _window(m: Migration, now: datetime) -> str:
    if m.state.is_terminal:
        return "done"
    delta = m.not_before - now
    return f"in {format_duration(delta)}" if delta.total_seconds() > 0 else "open"


@cli.command()
@click.argument("droplet_id")
@click.option("--json", "as_json", is_flag=True)
@pass_deps
def history(deps: Deps, droplet_id: str, as_json: bool) -> None:
    """Everything that happened to a droplet's migrations, oldest first."""
    store = deps.store()
    store.get_droplet(droplet_id)
    entries = store.history(droplet_id)
    if as_json:
        _json([_entry_doc(e) for e in entries])
        return
    if not entries:
        click.echo(f"no migrations of {droplet_id} yet")
        return
    rows = [[format_time(e.at), e.migration_id, e.kind, _states(e), e.message] for e in entries]
    click.echo(_table(["AT", "MIGRATION", "KIND", "STATE", "MESSAGE"], rows))


def _states(e: LogEntry) -> str:
    if e.to_state is None:
        return ""
    return f"{e.from_state.value if e.from_state else ''} -> {e.to_state.value}"


# ---- run -------------------------------------------------------------------------------------------------


@cli.command()
@click.option("--poll-interval", default=None, help="Time between ticks (default from config: 1s).")
@click.option("--max-ticks", type=int, default=None, help="Stop after N ticks (tests, cron).")
@_driver_option
@_sim_speed_option
@click.option(
    "--metrics-listen",
    default=None,
    metavar="HOST:PORT",
    help="Serve Prometheus metrics on http://HOST:PORT/metrics (PORT alone: loopback).",
)
@click.option(
    "--worker",
    default=None,
    metavar="NAME",
    help="This worker's name (default: config [engine] worker, else the hostname); one process per name.",
)
@log_format_option(envvar="HOST_ENGINE_LOG_FORMAT")
@pass_deps
def run(
    deps: Deps,
    poll_interval: str | None,
    max_ticks: int | None,
    driver: str | None,
    sim_speed: float,
    metrics_listen: str | None,
    worker: str | None,
    log_format: LogFormat,
) -> None:
    """The engine: reconcile the metadata servers, send notices as they fall due, and run the migrations
    whose window opened (SIGTERM stops it, releasing running attempts with their sources untouched)."""
    config = deps.config
    if poll_interval is not None:
        seconds = parse_duration(poll_interval, field="--poll-interval").total_seconds()
        if seconds <= 0:
            raise InvalidInput("--poll-interval must be positive", field="poll_interval")
        config = replace(config, engine=replace(config.engine, poll_interval_s=seconds))
    if worker is not None:
        config = replace(config, engine=replace(config.engine, worker=worker.strip()))
    listen = parse_listen(metrics_listen) if metrics_listen is not None else None
    verbose = click.get_current_context().find_root().params.get("verbose") or 0
    # A host program's own logging (a test harness) is left alone.
    setup_logging(log_format, logging.DEBUG if verbose > 1 else logging.INFO, replace_foreign=False)
    store = deps.store(create=True)  # a fresh fleet may start its workers before adding hosts
    with contextlib.ExitStack() as stack:
        # Refused, in one line, if another live process holds this worker name (it would take this one's
        # attempts for orphans, and the other way round).
        name = stack.enter_context(WorkerName(store, config.worker_id))
        health = EngineMetrics(config.worker_id, poll_interval_s=config.engine.poll_interval_s)
        clients = deps.client_factory or _client_factory(deps)
        metrics = ExecutorMetrics(store, registry=health.registry)
        if listen is not None:
            ready = Readiness(store, config.worker_id, lambda: name.held, started=health.has_ticked)
            stack.enter_context(serve_metrics(*listen, metrics.exposition, live=health.live, ready=ready))
            stack.enter_context(ServerProbe(store, clients, health))
        # On threads (executor, notices, a main thread that only waits for signals) unless a test drives
        # time through deps.sleep. Leaving the stack releases running attempts, sources untouched.
        wired = stack.enter_context(
            build_engine(
                store,
                config,
                driver or config.engine.driver,
                deps.clock,
                clients=clients,
                observer=health.server_answered,
                metrics=metrics,
                sim_speed=sim_speed,
                monotonic=deps.monotonic or time.monotonic,
                sleep=deps.sleep,
                threads=deps.sleep is None,
                before=[name],
                after=[health.beat_step()],
            )
        )
        engine = wired.engine
        name.on_lost = engine.request_stop
        engine.on_tick = health.tick_finished
        if deps.install_signals and threading.current_thread() is threading.main_thread():
            engine.install_signal_handlers()
        engine.run(max_ticks=max_ticks)


cli.add_command(demo_command)  # host-engine demo: host_engine/lab/demo/


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="host-engine", obj=Deps())
