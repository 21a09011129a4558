"""``host-engine``: the hosting engineer's command line.

Every mistake a user can make ends with ONE line on stderr (``host-engine: error: ...``) and the exit code of
its kind (see :mod:`host_engine.errors`; 2 for a bad flag or value). Commands that change the store do it in
one transaction, so a refused command leaves the store as it was.

Tests pass a :class:`Deps` as click's ``obj`` to inject the clock, the metadata-server client factory, the
libvirt domain lister, the sleep (the engine's, ``migrate --now``'s, ``status --watch``'s) and whether stdout
is a terminal.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

import click

from host_engine import inventory, planner
from host_engine import progress as progress_text
from host_engine.config import DRIVERS, EngineConfig, load_config
from host_engine.demo import demo as demo_command
from host_engine.drivers.sim import WorldConflict
from host_engine.engine import Engine
from host_engine.engine_steps import SimTickStep, executor_step
from host_engine.errors import (
    Conflict,
    HostEngineError,
    InvalidInput,
    MigrationIncomplete,
    TransientError,
)
from host_engine.executor import (
    ABORT_REQUEST_KEY,
    LAST_ATTEMPT_KEY,
    PROGRESS_KEY,
    Executor,
    request_abort,
    timeline,
)
from host_engine.executor_metrics import ExecutorMetrics
from host_engine.metrics_http import parse_listen, serve_metrics
from host_engine.models import Droplet, Host, LogEntry, Migration
from host_engine.placement import Choice, Plan
from host_engine.plot import plot_timeline
from host_engine.reconcile import ClientFactory, MetadataSync, default_client_factory
from host_engine.states import ACTIVE_STATES, HostState, MigrationState
from host_engine.store import DB_ENV, Store, default_db_path
from host_engine.timeparse import Clock, format_duration, format_time, parse_duration, parse_time, utc_now
from host_engine.units import format_size, parse_size

log = logging.getLogger(__name__)


@dataclass
class Deps:
    """What the CLI takes from the outside world; tests replace any of it."""

    clock: Clock = utc_now
    client_factory: ClientFactory | None = None
    lister: inventory.DomainLister | None = None
    sleep: Callable[[float], None] | None = None
    # The wall clock the simulated hypervisor follows (``time.monotonic``); tests tie it to their fake clock.
    monotonic: Callable[[], float] | None = None
    user: str | None = None
    install_signals: bool = True
    # Whether stdout is a terminal (``status --watch`` redraws in place); None: ask stdout.
    tty: bool | None = None
    # Filled in by the root command:
    db: str | None = None
    config: EngineConfig = field(default_factory=EngineConfig)
    _store: Store | None = None

    def store(self) -> Store:
        if self._store is None:
            target = self.db or self.config.db or str(default_db_path())
            self._store = Store.open(target, clock=self.clock)
        return self._store

    def requested_by(self, given: str | None) -> str:
        if given:
            return given
        if self.user is not None:
            return self.user
        try:
            return os.environ.get("SUDO_USER") or getpass.getuser()
        except (KeyError, OSError):
            return "unknown"

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None


class _Group(click.Group):
    """Turns every expected error into one line and its exit code."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as e:
            if ctx.parent is not None:
                raise
            click.echo(f"host-engine: error: {e.format_message()}", err=True)
            ctx.exit(2)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except HostEngineError as e:
            click.echo(f"host-engine: error: {e}", err=True)
            ctx.exit(e.exit_code)
        except click.UsageError as e:
            if ctx.parent is not None:
                raise
            click.echo(f"host-engine: error: {e.format_message()}", err=True)
            ctx.exit(2)


def _deps(ctx: click.Context) -> Deps:
    deps = ctx.find_object(Deps)
    if deps is None:  # pragma: no cover - the root command always creates one
        raise click.UsageError("internal: no dependencies")
    return deps


pass_deps = click.make_pass_decorator(Deps)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--db", envvar=DB_ENV, help=f"SQLite path or postgresql:// URL (env {DB_ENV}).")
@click.option(
    "--config", "config_path", envvar="HOST_ENGINE_CONFIG", help="TOML config (env HOST_ENGINE_CONFIG)."
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="SECTION.KEY=VALUE",
    help="Override one config value (repeat), e.g. --set overcommit.vcpu=2 --set notice.default=15m",
)
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.pass_context
def cli(
    ctx: click.Context, db: str | None, config_path: str | None, overrides: tuple[str, ...], verbose: int
) -> None:
    """Plan and run live migrations of droplets between hypervisors."""
    deps = ctx.ensure_object(Deps)
    deps.db = db
    deps.config = load_config(config_path, env={}, overrides=overrides)
    if verbose and not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.DEBUG if verbose > 1 else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
    ctx.call_on_close(deps.close)


# ---- helpers ---------------------------------------------------------------------------------------------


def _nonneg(value: int, name: str) -> int:
    if value < 0:
        raise InvalidInput(f"--{name} must not be negative, got {value}", field=name)
    return value


def _table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    text_rows = [[("-" if v is None else str(v)) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in text_rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in text_rows]
    return "\n".join(lines)


def _json(doc: object) -> None:
    click.echo(json.dumps(doc, indent=2, sort_keys=True, default=str))


def _json_line(doc: object) -> None:
    """One JSON document on one line (streams: ``migrate --now --json``, ``status --watch --json``)."""
    click.echo(json.dumps(doc, sort_keys=True, default=str, separators=(",", ":")))


def _host_doc(h: Host) -> dict[str, Any]:
    return {
        "name": h.name,
        "datacenter": h.datacenter,
        "compat_group": h.compat_group,
        "state": h.state.value,
        "vcpus": h.vcpus,
        "memory_bytes": h.memory_bytes,
        "disk_bytes": h.disk_bytes,
        "hypervisor_uri": h.hypervisor_uri,
        "metadata_url": h.metadata_url,
        "metadata_token_file": h.metadata_token_file,
        "state_reason": h.state_reason,
        "state_changed_by": h.state_changed_by,
    }


def _droplet_doc(d: Droplet) -> dict[str, Any]:
    return {
        "id": d.id,
        "host": d.host,
        "vcpus": d.vcpus,
        "memory_bytes": d.memory_bytes,
        "disk_bytes": d.disk_bytes,
        "owner_tag": d.owner_tag,
        "addresses": list(d.addresses),
        "hostname": d.hostname,
        "power_state": d.power_state,
    }


def _migration_doc(m: Migration, now: datetime) -> dict[str, Any]:
    return {
        "id": m.id,
        "droplet": m.droplet_id,
        "state": m.state.value,
        "source": m.source_host,
        "target": m.target_host,
        "event_id": m.event_id,
        "not_before": format_time(m.not_before),
        "notice_at": format_time(m.notice_at),
        "notified_at": format_time(m.notified_at),
        "deadline": format_time(m.deadline),
        "seconds_to_window": int((m.not_before - now).total_seconds()),
        "attempt": m.attempt,
        "max_attempts": m.max_attempts,
        "reason": m.reason,
        "requested_by": m.requested_by,
        "last_error": m.last_error,
        "finished_at": format_time(m.finished_at),
        "stats": dict(m.stats),
    }


# ---- host ------------------------------------------------------------------------------------------------


@cli.group()
def host() -> None:
    """Hypervisors: add, list, show, set-state."""


@host.command("add")
@click.argument("name")
@click.option("--datacenter", required=True)
@click.option("--vcpus", type=int, required=True)
@click.option("--memory", required=True, help="e.g. 256GiB")
@click.option("--disk", required=True, help="e.g. 4TiB")
@click.option(
    "--compat-group", default="", help="CPU model / hypervisor version: live moves stay inside one."
)
@click.option("--uri", default="", help="libvirt URI of the hypervisor.")
@click.option("--metadata-url", default="", help="Admin URL of the metadata server serving its droplets.")
@click.option("--metadata-token-file", default="", help="File holding that server's admin bearer token.")
@click.option("--state", type=click.Choice([s.value for s in HostState]), default="active")
@pass_deps
def host_add(
    deps: Deps,
    name: str,
    datacenter: str,
    vcpus: int,
    memory: str,
    disk: str,
    compat_group: str,
    uri: str,
    metadata_url: str,
    metadata_token_file: str,
    state: str,
) -> None:
    """Add a hypervisor."""
    if not name.strip():
        raise InvalidInput("host name must not be empty", field="name")
    if metadata_url and not metadata_url.startswith(("http://", "https://")):
        raise InvalidInput(
            f"--metadata-url must be an http(s) URL, got {metadata_url!r}", field="metadata_url"
        )
    h = Host(
        name=name,
        datacenter=datacenter,
        vcpus=_nonneg(vcpus, "vcpus"),
        memory_bytes=parse_size(memory, field="--memory"),
        disk_bytes=parse_size(disk, field="--disk"),
        compat_group=compat_group,
        state=HostState(state),
        hypervisor_uri=uri,
        metadata_url=metadata_url,
        metadata_token_file=os.path.abspath(metadata_token_file) if metadata_token_file else "",
    )
    deps.store().add_host(h)
    click.echo(f"host {name} added ({datacenter}, {vcpus} vCPUs, {format_size(h.memory_bytes)}, "
               f"{format_size(h.disk_bytes)} disk)")  # fmt: skip


@host.command("list")
@click.option("--datacenter")
@click.option("--json", "as_json", is_flag=True)
@pass_deps
def host_list(deps: Deps, datacenter: str | None, as_json: bool) -> None:
    """List hypervisors with what is committed to them."""
    store = deps.store()
    with store.begin(readonly=True) as tx:
        hosts = tx.list_hosts(datacenter=datacenter)
        usage = tx.usage_by_host()
    if as_json:
        _json(
            [{**_host_doc(h), "committed": vars(usage[h.name]) if h.name in usage else None} for h in hosts]
        )
        return
    rows = []
    for h in hosts:
        u = usage.get(h.name)
        rows.append(
            [
                h.name,
                h.datacenter,
                h.state.value,
                h.compat_group or "-",
                f"{u.vcpus if u else 0}/{h.vcpus}",
                f"{format_size(u.memory_bytes if u else 0)}/{format_size(h.memory_bytes)}",
                f"{format_size(u.disk_bytes if u else 0)}/{format_size(h.disk_bytes)}",
                u.droplets if u else 0,
            ]
        )
    click.echo(_table(["HOST", "DC", "STATE", "GROUP", "VCPUS", "MEMORY", "DISK", "DROPLETS"], rows))


@host.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@pass_deps
def host_show(deps: Deps, name: str, as_json: bool) -> None:
    """One hypervisor, its droplets and its migrations."""
    store = deps.store()
    with store.begin(readonly=True) as tx:
        h = tx.get_host(name)
        droplets = tx.list_droplets(host=name)
        migrations = tx.list_migrations(host=name, states=ACTIVE_STATES)
    now = deps.clock()
    if as_json:
        _json(
            {
                **_host_doc(h),
                "droplets": [_droplet_doc(d) for d in droplets],
                "migrations": [_migration_doc(m, now) for m in migrations],
            }
        )
        return
    for key, value in _host_doc(h).items():
        shown = format_size(int(value)) if key in ("memory_bytes", "disk_bytes") else value
        click.echo(f"{key:20} {shown}")
    click.echo(f"{'droplets':20} {len(droplets)}: {', '.join(d.id for d in droplets) or '-'}")
    click.echo(f"{'active migrations':20} {len(migrations)}")


@host.command("set-state")
@click.argument("name")
@click.argument("state", type=click.Choice([s.value for s in HostState]))
@click.option("--reason", default="")
@click.option("--by", "by", default=None, help="Who asks (default: the login name).")
@pass_deps
def host_set_state(deps: Deps, name: str, state: str, reason: str, by: str | None) -> None:
    """Mark a hypervisor active, maintenance (nothing new lands on it) or down."""
    h = deps.store().set_host_state(name, HostState(state), reason=reason, by=deps.requested_by(by))
    click.echo(f"host {h.name} is {h.state.value}")


# ---- droplet ---------------------------------------------------------------------------------------------


@cli.group()
def droplet() -> None:
    """Droplets: add, set, list, show."""


@droplet.command("add")
@click.argument("droplet_id")
@click.option("--host", "host_name", required=True)
@click.option("--vcpus", type=int, required=True)
@click.option("--memory", required=True)
@click.option("--disk", required=True)
@click.option("--owner-tag", default="", help="Droplets with the same tag are kept on different hosts.")
@click.option("--address", "addresses", multiple=True, help="IPv4/IPv6 address the guest uses (repeat).")
@click.option("--hostname", default="")
@pass_deps
def droplet_add(
    deps: Deps,
    droplet_id: str,
    host_name: str,
    vcpus: int,
    memory: str,
    disk: str,
    owner_tag: str,
    addresses: tuple[str, ...],
    hostname: str,
) -> None:
    """Record a droplet running on a host."""
    d = Droplet(
        id=inventory.check_droplet_id(droplet_id),
        host=host_name,
        vcpus=_nonneg(vcpus, "vcpus"),
        memory_bytes=parse_size(memory, field="--memory"),
        disk_bytes=parse_size(disk, field="--disk"),
        owner_tag=owner_tag,
        addresses=_check_addresses(addresses),
        hostname=hostname,
    )
    deps.store().add_droplet(d)
    click.echo(f"droplet {droplet_id} added on {host_name}")


def _check_addresses(addresses: Iterable[str]) -> tuple[str, ...]:
    import ipaddress

    out = []
    for a in addresses:
        try:
            out.append(str(ipaddress.ip_address(a)))
        except ValueError as e:
            raise InvalidInput(f"--address {a!r} is not an IPv4 or IPv6 address", field="address") from e
    return tuple(out)


@droplet.command("set")
@click.argument("droplet_id")
@click.option("--owner-tag", default=None)
@click.option("--address", "addresses", multiple=True, help="Replaces the addresses (repeat).")
@click.option("--hostname", default=None)
@pass_deps
def droplet_set(
    deps: Deps, droplet_id: str, owner_tag: str | None, addresses: tuple[str, ...], hostname: str | None
) -> None:
    """Change a droplet's owner tag, addresses or hostname (its size comes from inventory sync)."""
    changes: dict[str, Any] = {}
    if owner_tag is not None:
        changes["owner_tag"] = owner_tag
    if addresses:
        changes["addresses"] = _check_addresses(addresses)
    if hostname is not None:
        changes["hostname"] = hostname
    if not changes:
        raise InvalidInput("nothing to change (--owner-tag, --address, --hostname)")
    with deps.store().begin() as tx:
        tx.update_droplet(droplet_id, **changes)
    click.echo(f"droplet {droplet_id} updated")


@droplet.command("list")
@click.option("--host", "host_name")
@click.option("--json", "as_json", is_flag=True)
@pass_deps
def droplet_list(deps: Deps, host_name: str | None, as_json: bool) -> None:
    """List droplets (on one host with --host)."""
    store = deps.store()
    if host_name is not None:
        store.get_host(host_name)
    droplets = store.list_droplets(host=host_name)
    if as_json:
        _json([_droplet_doc(d) for d in droplets])
        return
    rows = [
        [d.id, d.host, d.vcpus, format_size(d.memory_bytes), format_size(d.disk_bytes), d.owner_tag or "-",
         ",".join(d.addresses) or "-", d.power_state]
        for d in droplets
    ]  # fmt: skip
    click.echo(_table(["DROPLET", "HOST", "VCPUS", "MEMORY", "DISK", "OWNER", "ADDRESSES", "POWER"], rows))


@droplet.command("show")
@click.argument("droplet_id")
@click.option("--json", "as_json", is_flag=True)
@pass_deps
def droplet_show(deps: Deps, droplet_id: str, as_json: bool) -> None:
    """One droplet and its current migration."""
    store = deps.store()
    with store.begin(readonly=True) as tx:
        d = tx.get_droplet(droplet_id)
        m = tx.active_migration_for(droplet_id)
    doc = {**_droplet_doc(d), "migration": _migration_doc(m, deps.clock()) if m else None}
    if as_json:
        _json(doc)
        return
    for key, value in _droplet_doc(d).items():
        shown = format_size(int(value)) if key in ("memory_bytes", "disk_bytes") else value
        click.echo(f"{key:14} {shown}")
    click.echo(f"{'migration':14} " + (f"{m.id} {m.state.value} -> {m.target_host}" if m else "-"))


# ---- inventory -------------------------------------------------------------------------------------------


@cli.group("inventory")
def inventory_group() -> None:
    """Read what the hypervisors actually run."""


@inventory_group.command("sync")
@click.argument("host_name")
@click.option("--dry-run", is_flag=True, help="Report, change nothing.")
@click.option("--json", "as_json", is_flag=True)
@pass_deps
def inventory_sync(deps: Deps, host_name: str, dry_run: bool, as_json: bool) -> None:
    """Record the domains libvirt reports on HOST (through the host's --uri)."""
    report = inventory.sync_host(deps.store(), host_name, lister=deps.lister, dry_run=dry_run)
    if as_json:
        _json({**report.to_dict(), "dry_run": dry_run})
        return
    prefix = "would add" if dry_run else "added"
    click.echo(f"{host_name}: {prefix} {len(report.added)}, updated {len(report.updated)}, "
               f"unchanged {len(report.unchanged)}")  # fmt: skip
    for did in report.added:
        click.echo(f"  + {did}")
    for did in report.updated:
        click.echo(f"  ~ {did}")
    for did, where in report.elsewhere:
        click.echo(f"  ! {did}: libvirt shows it here, the store says it is on {where} (left alone)")
    for did in report.missing:
        click.echo(f"  ? {did}: in the store on {host_name}, not reported by libvirt (left alone)")
    for dom, why in report.skipped:
        click.echo(f"  - {dom}: skipped, {why}")


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
@pass_deps
def plan_evacuate(
    deps: Deps, host_name: str, explain: tuple[str, ...], as_json: bool, anti_affinity: bool | None
) -> None:
    """Where every droplet of HOST would go, with scores, runners-up and filter rejections."""
    config = _with_anti_affinity(deps.config, anti_affinity)
    result = planner.preview_evacuation(deps.store(), host_name, config, explain=explain)
    if as_json:
        _json(result.to_dict())
    else:
        if not result.choices:
            click.echo(f"no droplets to move on {host_name}")
        else:
            _print_plan(result)
        for did in explain:
            _print_explain(result.choice(did))
    if result.unplaced:
        ids = ", ".join(c.droplet_id for c in result.unplaced)
        click.echo(f"host-engine: error: no host can take {len(result.unplaced)} droplet(s): {ids}", err=True)
        sys.exit(5)


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
) -> None:
    """Move every droplet off HOST from --start on; HOST goes into maintenance."""
    req = _request(
        deps, start, notice, unsafe_short_notice, max_parallel, max_per_target, reason, requested_by
    )
    config = _with_anti_affinity(deps.config, anti_affinity)
    schedule, written = planner.evacuate(deps.store(), host_name, req, config, dry_run=dry_run)
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
    help="Hypervisor driver (default: config [engine] driver, else sim).",
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
    req = _request(deps, start or f"+{notice}", notice, unsafe_short_notice, None, None, reason, requested_by)
    schedule, written = planner.migrate_one(
        deps.store(), droplet_id, req, deps.config, to=to, dry_run=dry_run
    )
    if not now or dry_run:
        _schedule_output(schedule, as_json, written)
        if not as_json:
            click.echo("dry run: nothing written" if dry_run else f"migration {written[0].id} planned")
        return
    _run_now(deps, written[0], driver or deps.config.engine.driver, sim_speed, as_json)


def _run_now(deps: Deps, planned: Migration, driver: str, sim_speed: float, as_json: bool) -> None:
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
    with MetadataSync(store, deps.client_factory or _client_factory(deps)) as sync:
        engine = Engine(store, deps.config, sync, clock=deps.clock, sleep=sleep)
        _sent, errors = engine.send_due_notices()
        m = store.get_migration(mid)
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
        step = _executor_step(deps, store, deps.config, driver, hooks=sync, sim_speed=sim_speed, only=[mid])
        try:
            m = _drive_one(deps, step, mid, out, sleep)
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
        if e.kind == "progress" and e.data:
            self.progress(e.data, at=e.at)
        else:
            self.say(f"  {e.message}", {"type": "log", **_entry_doc(e)})

    def progress(self, p: Mapping[str, object], *, at: datetime | None = None) -> None:
        line = progress_text.summary(p)
        when = format_time(at or self.clock())
        self.say(f"  {line}", {"type": "progress", "at": when, "summary": line, **p})

    def result(self, m: Migration, rows: list[dict[str, object]]) -> None:
        if self.as_json:
            _json_line({"type": "result", **_migration_doc(m, self.clock()), "timeline": rows})


def _drive_one(
    deps: Deps,
    step: SimTickStep | Executor,
    mid: str,
    out: _NowReport,
    sleep: Callable[[float], None],
) -> Migration:
    """Tick ``step`` until migration ``mid`` ends, echoing its log (progress lines with percent and ETA).

    SIGINT/SIGTERM stop the attempt cleanly (source untouched; it goes back to the retry path)."""
    store = step.store
    stop = threading.Event()
    restore = _catch_stop_signals(stop) if deps.install_signals else {}
    seen = len(store.migration_log(mid))
    wall = deps.monotonic or time.monotonic
    last_said_s, last_shown = wall(), None
    try:
        while True:
            try:
                step.tick()
            except WorldConflict as e:
                raise _world_conflict(e) from e
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
            sleep(deps.config.engine.poll_interval_s)
    finally:
        for signum, handler in restore.items():
            signal.signal(signum, handler)
        _shutdown_step(step)
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


def _world_conflict(e: WorldConflict) -> Conflict:
    return Conflict(
        f"the simulated datacenter is driven by another host-engine process ({e}); "
        "follow it with host-engine status"
    )


def _shutdown_step(step: SimTickStep | Executor) -> None:
    """Release this process's running attempts now (sources untouched), not at the claim's lease expiry."""
    try:
        for f in step.shutdown():
            log.info("migration_id=%s: attempt %s stopped (%s)", f.migration_id, f.attempt, f.state.value)
    except WorldConflict as e:
        log.error("sim world changed under this process; not saved: %s", e)
    except HostEngineError as e:
        log.error("shutting the executor down failed (its claims expire on their own): %s", e)


def _executor_step(
    deps: Deps,
    store: Store,
    config: EngineConfig,
    driver: str,
    *,
    hooks: MetadataSync,
    sim_speed: float,
    metrics: ExecutorMetrics | None = None,
    only: Sequence[str] | None = None,
) -> SimTickStep | Executor:
    try:
        return executor_step(
            store,
            config,
            driver=driver,
            hooks=hooks,
            metrics=metrics,
            sim_speed=sim_speed,
            only=only,
            monotonic=deps.monotonic or time.monotonic,
        )
    except WorldConflict as e:
        raise _world_conflict(e) from e


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


def _client_factory(deps: Deps) -> ClientFactory:
    e = deps.config.engine
    return default_client_factory(
        timeout_s=e.notifier_timeout_s,
        attempts=e.notifier_attempts,
        sleep=deps.sleep,
        ca_file=e.metadata_ca_file,
    )


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
        [m.id, m.droplet_id, m.state.value, f"{m.source_host} -> {m.target_host}", format_time(m.not_before),
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
        state = m.state.value + (", abort requested" if m.stats.get(ABORT_REQUEST_KEY) else "")
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
    return progress_text.short(p) + (" (abort requested)" if m.stats.get("abort_requested_by") else "")


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
    if plot_path is not None:
        title = f"{m.id}: {m.droplet_id} {m.source_host} -> {m.target_host}, {m.state.value}"
        written = plot_timeline(rows, plot_path, title=title)
        click.echo(f"plot written to {written}", err=as_json)
    if as_json:
        _json({"migration": _migration_doc(m, deps.clock()), "timeline": rows})
        return
    click.echo(
        f"{m.id}: {m.droplet_id} {m.source_host} -> {m.target_host}, {m.state.value}, "
        f"attempt {m.attempt}/{m.max_attempts}"
    )
    last = m.stats.get(LAST_ATTEMPT_KEY)
    if isinstance(last, dict):
        click.echo("last attempt: " + ", ".join(f"{k} {v}" for k, v in last.items() if v is not None))
    if not rows:
        click.echo("no progress recorded yet")
        return
    click.echo(_table(progress_text.TIMELINE_HEADERS, [progress_text.timeline_row(r) for r in rows]))


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


def _entry_doc(e: LogEntry) -> dict[str, Any]:
    return {
        "at": format_time(e.at),
        "migration": e.migration_id,
        "kind": e.kind,
        "from": e.from_state.value if e.from_state else None,
        "to": e.to_state.value if e.to_state else None,
        "message": e.message,
        "data": dict(e.data),
    }


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
@pass_deps
def run(
    deps: Deps,
    poll_interval: str | None,
    max_ticks: int | None,
    driver: str | None,
    sim_speed: float,
    metrics_listen: str | None,
) -> None:
    """The engine: reconcile the metadata servers, send notices as they fall due, and run the migrations
    whose window opened (SIGTERM stops it, releasing running attempts with their sources untouched)."""
    config = deps.config
    if poll_interval is not None:
        seconds = parse_duration(poll_interval, field="--poll-interval").total_seconds()
        if seconds <= 0:
            raise InvalidInput("--poll-interval must be positive", field="poll_interval")
        config = replace(config, engine=replace(config.engine, poll_interval_s=seconds))
    listen = parse_listen(metrics_listen) if metrics_listen is not None else None
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    store = deps.store()
    with contextlib.ExitStack() as stack:
        sync = stack.enter_context(MetadataSync(store, deps.client_factory or _client_factory(deps)))
        metrics = ExecutorMetrics(store)
        if listen is not None:
            stack.enter_context(serve_metrics(*listen, metrics.exposition))
        step = _executor_step(
            deps,
            store,
            config,
            driver or config.engine.driver,
            hooks=sync,
            sim_speed=sim_speed,
            metrics=metrics,
        )
        engine = Engine(store, config, sync, clock=deps.clock, sleep=deps.sleep, steps=[step])
        if deps.install_signals and threading.current_thread() is threading.main_thread():
            engine.install_signal_handlers()
        try:
            engine.run(max_ticks=max_ticks)
        except WorldConflict as e:
            raise _world_conflict(e) from e
        finally:
            _shutdown_step(step)


cli.add_command(demo_command)  # host-engine demo: host_engine/demo.py


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="host-engine", obj=Deps())
