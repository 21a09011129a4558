"""``host-engine plan|evacuate|migrate|cancel``: where droplets go and when (``migrate --now`` then drives the
migration here: ``host_engine.cli.migrate_now``)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

import click

from host_engine import evacuation_forecast, planner, prediction
from host_engine.cli.app import (
    Deps,
    _client_factory,
    _json,
    _table,
    cli,
    pass_deps,
)
from host_engine.cli.migrate_now import run_now
from host_engine.config import DRIVERS, EngineConfig
from host_engine.engine_steps import plan_drivers
from host_engine.errors import (
    HostEngineError,
    InvalidInput,
)
from host_engine.metadata.reconcile import MetadataSync
from host_engine.models import Migration
from host_engine.placement import Choice, Plan
from host_engine.requests import bandwidth_mibps, parse_bandwidth
from host_engine.states import HostState
from host_engine.timeparse import format_time, parse_duration, parse_time

log = logging.getLogger(__name__)


# ---- plan / evacuate / migrate / cancel ------------------------------------------------------------------


def _runners(c: Choice) -> str:
    return ", ".join(f"{h} ({s:.3f})" for h, s in c.runners_up) or "-"


def _print_plan(plan: Plan, times: dict[str, tuple[datetime, datetime]] | None = None) -> None:
    rows = []
    for c in plan.choices:
        row: list[object] = [
            c.droplet_id,
            c.target or "NONE",
            f"{c.score:.3f}" if c.score is not None else None,
        ]
        if times is not None:
            nb, notice = times.get(c.droplet_id, (None, None))
            row += [format_time(nb), format_time(notice)]
        row += [_runners(c), c.summary_of_rejections()]
        rows.append(row)
    headers = ["DROPLET", "TARGET", "SCORE"]
    if times is not None:
        headers += ["NOT_BEFORE", "NOTICE_AT"]
    headers += ["RUNNERS-UP", "REJECTED BY FILTER"]
    click.echo(_table(headers, rows))


def _print_explain(c: Choice) -> None:
    click.echo(f"\n{c.droplet_id}: every host's verdict")
    rows = []
    for v in c.verdicts or ():
        if v.accepted:
            detail = ", ".join(f"{k} {val:.3f}" for k, val in v.components.items())
            rows.append([v.host, f"#{v.rank}", f"{v.score:.3f}" if v.score is not None else None, detail])
        else:
            rows.append([v.host, f"rejected: {v.filter}", None, v.reason])
    click.echo(_table(["HOST", "VERDICT", "SCORE", "DETAIL"], rows))


@cli.group()
def plan() -> None:
    """Preview plans without writing anything."""


@plan.command("evacuate")
@click.argument("host_name")
@click.option("--explain", "explain", multiple=True, help="Show every host's verdict for this droplet.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--anti-affinity/--no-anti-affinity", default=None, help="Override the config's anti_affinity.")
@click.option(
    "--predict",
    is_flag=True,
    help="Also simulate each move: duration, downtime, bytes, throttle, risk, window.",
)
@pass_deps
def plan_evacuate(
    deps: Deps,
    host_name: str,
    explain: tuple[str, ...],
    as_json: bool,
    anti_affinity: bool | None,
    predict: bool,
) -> None:
    """Where every droplet of HOST would go, with scores, runners-up and filter rejections."""
    config = _with_anti_affinity(deps.config, anti_affinity)
    result = planner.preview_evacuation(deps.store(), host_name, config, explain=explain)
    forecast = _forecast(deps, result, host_name) if predict else None
    if as_json:
        _json({**result.to_dict(), **({"forecast": forecast.to_dict()} if forecast else {})})
    else:
        if not result.choices:
            click.echo(f"no droplets to move on {host_name}")
        else:
            _print_plan(result)
        for did in explain:
            _print_explain(result.choice(did))
        if forecast is not None:
            print_forecast(forecast)
    if result.unplaced:
        ids = ", ".join(c.droplet_id for c in result.unplaced)
        click.echo(f"host-engine: error: no host can take {len(result.unplaced)} droplet(s): {ids}", err=True)
        sys.exit(5)


def _forecast(deps: Deps, result: Plan, host_name: str) -> prediction.Forecast:
    """``plan evacuate --predict``: the plan's moves as ``host-engine run`` would run them after an
    ``evacuate`` with no flags (``evacuation_forecast``: one shared run, the planner's windows)."""
    cfg = deps.config
    with deps.store().begin(readonly=True) as tx:
        droplets = tx.list_droplets(host=host_name)
        seed = evacuation_forecast.sim_seed(tx)
    moves = evacuation_forecast.moves_of_plan(result, droplets, host_name, cfg)
    return evacuation_forecast.forecast_evacuation(
        moves, cfg, cap_mibps=cfg.libvirt.bandwidth_mibps, seed=seed
    )


def _store_predictions(deps: Deps, written: list[Migration]) -> list[Migration]:
    """Simulate the written migrations as the executor will run them and keep each prediction in its stats.

    The notices may already be on their way: the metadata reconciliation sees the event lacking the
    prediction and sets it again, so the guest learns it before its window either way.
    """
    store, cfg = deps.store(), deps.config
    with store.begin(readonly=True) as tx:
        seed = evacuation_forecast.sim_seed(tx)
    # One evacuate gives all its migrations the same --bandwidth (else the configured default).
    cap = bandwidth_mibps(written[0].stats) or cfg.libvirt.bandwidth_mibps
    return evacuation_forecast.store_predictions(store, cfg, written, cap_mibps=cap, seed=seed)


def print_forecast(forecast: prediction.Forecast) -> None:
    """The predictions as a table, and the window's length under the limits."""
    rows = []
    for droplet_id, _source, target, p in forecast.predictions:
        rows.append(
            [
                droplet_id,
                target,
                f"{p.duration_s:.1f}",
                "-" if p.downtime_ms is None else f"{p.downtime_ms:.0f}",
                f"{p.bytes_transferred / 1024**3:.2f}",
                f"{p.throttled_s:.1f} (max {p.max_throttle_pct} %)" if p.max_throttle_pct else "no",
                p.risk.value if p.converges else f"{p.risk.value}: {p.outcome}",
            ]
        )
    click.echo(
        "\npredicted (simulated with [sim]: each droplet's workload, each host's link and costs; the moves "
        "run as the executor runs them, sharing each host's link)"
    )
    click.echo(_table(["DROPLET", "TARGET", "DURATION_S", "DOWNTIME_MS", "GIB", "THROTTLED_S", "RISK"], rows))
    for droplet_id, _source, _target, p in forecast.predictions:
        if p.note:
            click.echo(f"{droplet_id}: {p.note}")
    click.echo(f"window: {forecast.window_s:.0f} s with {forecast.limits.describe()}")


def _with_anti_affinity(config: EngineConfig, anti_affinity: bool | None) -> EngineConfig:
    if anti_affinity is None:
        return config
    return replace(config, placement=replace(config.placement, anti_affinity=anti_affinity))


def _request(
    deps: Deps,
    start: str,
    notice: str | None,
    unsafe: bool,
    max_parallel: int | None,
    max_per_target: int | None,
    reason: str,
    requested_by: str | None,
    bandwidth: str | None = None,
) -> planner.Request:
    cfg = deps.config.schedule
    now = deps.clock()
    return planner.Request(
        start=parse_time(start, now=now, field="--start"),
        notice=parse_duration(notice, field="--notice") if notice is not None else cfg.notice,
        limits=planner.Limits(
            max_parallel if max_parallel is not None else cfg.max_parallel,
            max_per_target if max_per_target is not None else cfg.max_per_target,
            cfg.max_per_source if max_parallel is None else max(cfg.max_per_source, max_parallel),
        ),
        reason=reason,
        requested_by=deps.requested_by(requested_by),
        unsafe_short_notice=unsafe,
        bandwidth_mibps=parse_bandwidth(bandwidth) if bandwidth is not None else None,
    )


def _schedule_output(schedule: planner.Schedule, as_json: bool, written: Sequence[Migration]) -> None:
    if as_json:
        _json({**schedule.to_dict(), "migrations": [m.id for m in written]})
        return
    times = {mv.droplet.id: (mv.not_before, mv.notice_at) for mv in schedule.moves}
    if schedule.moves:
        _print_plan(schedule.plan, times)
    for did in schedule.skipped:
        click.echo(f"{did}: already migrating, left as planned")


_START_HELP = "RFC 3339 time with a zone (2026-12-01T02:00Z), now, or +30m."

_timing_options = [
    click.option(
        "--notice", default=None, help="How long before its window each guest is told (default 10m)."
    ),
    click.option(
        "--unsafe-short-notice", is_flag=True, help="Allow a notice under the minimum (demos, tests)."
    ),
    click.option("--reason", default="", help="Why: recorded and shown in history."),
    click.option("--requested-by", default=None, help="Who asks (default: the login name)."),
    click.option("--dry-run", is_flag=True, help="Show the plan, write nothing."),
    click.option("--json", "as_json", is_flag=True),
    click.option(
        "--bandwidth",
        default=None,
        metavar="RATE",
        help="Cap each migration's copy at RATE (e.g. 200MiB/s; whole MiB/s); also sizes its slot. "
        "Default: [libvirt] bandwidth_mibps.",
    ),
]


def _timing(f: Callable[..., Any]) -> Callable[..., Any]:
    for opt in reversed([click.option("--start", required=True, help=_START_HELP), *_timing_options]):
        f = opt(f)
    return f


def _timing_or_now(f: Callable[..., Any]) -> Callable[..., Any]:
    """``migrate``'s timing: ``--start`` or ``--now`` (run it in this process, at once)."""
    options = [
        click.option("--start", default=None, help=_START_HELP + " Required unless --now."),
        click.option(
            "--now",
            is_flag=True,
            help="Notify at once and run the migration here, printing progress, until it ends "
            "(needs --unsafe-short-notice; --notice, default 0s, delays the window).",
        ),
        *_timing_options,
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


@cli.command()
@click.argument("host_name")
@_timing
@click.option("--max-parallel", type=int, default=None, help="Migrations at once, fleet-wide.")
@click.option("--max-per-target", type=int, default=None, help="Migrations at once into one host.")
@click.option("--anti-affinity/--no-anti-affinity", default=None)
@click.option(
    "--predict",
    is_flag=True,
    help="Simulate each migration (as plan evacuate --predict) and store the prediction with it: "
    "its guest is told the expected downtime and duration, and report compares them with the actual.",
)
@pass_deps
def evacuate(
    deps: Deps,
    host_name: str,
    start: str,
    notice: str | None,
    unsafe_short_notice: bool,
    reason: str,
    requested_by: str | None,
    dry_run: bool,
    as_json: bool,
    max_parallel: int | None,
    max_per_target: int | None,
    anti_affinity: bool | None,
    bandwidth: str | None,
    predict: bool,
) -> None:
    """Move every droplet off HOST from --start on; HOST goes into maintenance."""
    req = _request(
        deps,
        start,
        notice,
        unsafe_short_notice,
        max_parallel,
        max_per_target,
        reason,
        requested_by,
        bandwidth,
    )
    config = _with_anti_affinity(deps.config, anti_affinity)
    schedule, written = planner.evacuate(deps.store(), host_name, req, config, dry_run=dry_run)
    if predict and written:
        written = _store_predictions(deps, written)
    _schedule_output(schedule, as_json, written)
    if as_json:
        return
    if dry_run:
        click.echo(f"dry run: {len(schedule.moves)} migration(s) would be planned; nothing written")
    else:
        line = f"host {host_name} is in maintenance; {len(written)} migration(s) planned"
        if written:
            first = format_time(min(m.notice_at for m in written))
            line += f", first notice {first}, last window {format_time(max(m.not_before for m in written))}"
        click.echo(line)


_driver_option = click.option(
    "--driver",
    type=click.Choice(DRIVERS),
    default=None,
    help="Insist on one driver (default: config [engine] driver, else auto: each host by its URI).",
)
_sim_speed_option = click.option(
    "--sim-speed",
    type=click.FloatRange(min=0.0, min_open=True),
    default=1.0,
    show_default=True,
    help="sim driver: simulated seconds per wall-clock second.",
)


@cli.command()
@click.argument("droplet_id")
@click.option("--to", "to", default=None, help="Target host (must still pass every filter).")
@_timing_or_now
@_driver_option
@_sim_speed_option
@pass_deps
def migrate(
    deps: Deps,
    droplet_id: str,
    to: str | None,
    start: str | None,
    now: bool,
    notice: str | None,
    unsafe_short_notice: bool,
    reason: str,
    requested_by: str | None,
    dry_run: bool,
    as_json: bool,
    driver: str | None,
    sim_speed: float,
    bandwidth: str | None,
) -> None:
    """Move one droplet (to the best host, or --to HOST) from --start on, or --now in this process."""
    if now and start is not None:
        raise InvalidInput("--now and --start exclude each other", field="start")
    if not now and start is None:
        raise click.MissingParameter(param_hint="'--start'", param_type="option")
    if now and not unsafe_short_notice:
        raise InvalidInput(
            "--now notifies the guest at once, with no notice period: add --unsafe-short-notice "
            "(demos, tests, emergencies)",
            field="now",
        )
    if now:
        notice = notice if notice is not None else "0s"
        # The driver follows from the hosts: refused (one line) before any notice goes out.
        plan_drivers(deps.store().list_hosts(), driver or deps.config.engine.driver)
    req = _request(
        deps, start or f"+{notice}", notice, unsafe_short_notice, None, None, reason, requested_by, bandwidth
    )
    schedule, written = planner.migrate_one(
        deps.store(), droplet_id, req, deps.config, to=to, dry_run=dry_run
    )
    if not now or dry_run:
        _schedule_output(schedule, as_json, written)
        if not as_json:
            click.echo("dry run: nothing written" if dry_run else f"migration {written[0].id} planned")
        return
    run_now(deps, written[0], driver or deps.config.engine.driver, sim_speed, as_json)


@cli.command()
@click.argument("migration_id", required=False)
@click.option("--host", "host_name", default=None, help="Cancel every cancellable migration out of HOST.")
@click.option("--reason", default="")
@click.option("--by", "by", default=None)
@pass_deps
def cancel(deps: Deps, migration_id: str | None, host_name: str | None, reason: str, by: str | None) -> None:
    """Cancel a migration (or all of a host's); guests already told see their event cleared."""
    store = deps.store()
    cancelled = planner.cancel(
        store, migration_id=migration_id, host=host_name, by=deps.requested_by(by), reason=reason
    )
    for m in cancelled:
        click.echo(f"{m.id} ({m.droplet_id}) cancelled")
    if not cancelled:
        click.echo("nothing to cancel")
    told = [m for m in cancelled if m.notified_at is not None]
    if told:
        with MetadataSync(store, deps.client_factory or _client_factory(deps)) as sync:
            for m in told:
                try:
                    sync.clear(m)
                except HostEngineError as e:
                    click.echo(f"{m.id}: event not cleared yet ({e}); the engine will retry", err=True)
    if host_name is not None:
        h = store.get_host(host_name)
        if h.state is HostState.MAINTENANCE:
            click.echo(
                f"host {host_name} stays in maintenance (host set-state {host_name} active to reopen it)"
            )
