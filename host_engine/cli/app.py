"""``host-engine``: the hosting engineer's command line.

Every mistake a user can make ends with ONE line on stderr (``host-engine: error: ...``) and the exit code of
its kind (see :mod:`host_engine.errors`; 2 for a bad flag or value). Commands that change the store do it in
one transaction, so a refused command leaves the store as it was.

Tests pass a :class:`Deps` as click's ``obj`` to inject the clock, the metadata-server client factory, the
libvirt domain lister, the sleep (the engine's, ``migrate --now``'s, ``status --watch``'s) and whether stdout
is a terminal.
"""

from __future__ import annotations

import getpass
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import click

from guest_sdk.daemon_logging import LogFormat, active_format, error_line, setup_logging
from host_engine import inventory
from host_engine.config import EngineConfig, load_config
from host_engine.errors import (
    HostEngineError,
    InvalidInput,
)
from host_engine.metadata.reconcile import ClientFactory
from host_engine.models import Droplet, Host, LogEntry, Migration
from host_engine.store import DB_ENV, Store, StoreMissing, default_db_path, store_location
from host_engine.timeparse import Clock, format_time, utc_now

log = logging.getLogger(__name__)

#: What a command that needs a store says when there is none.
MISSING_STORE_HINT = "create one with `host-engine init` or `host-engine host add`"


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

    def target(self) -> str:
        """The store's path or URL: ``--db`` (or ``$HOST_ENGINE_DB``), the config's ``db``, or the default."""
        return self.db or self.config.db or str(default_db_path())

    def store(self, *, create: bool = False) -> Store:
        """The store, opened once per command.

        Only commands that can start from nothing (``init``, ``host add``, ``run``) pass ``create=True``; the
        first of them to find no store creates it and says so on stderr. Every other command (every read,
        and every change to records that must already exist) refuses a missing store in one line and leaves
        nothing behind: a mistyped ``--db`` never turns into an empty store that answers "no hosts"."""
        if self._store is None:
            try:
                self._store = Store.open(self.target(), clock=self.clock, create=create)
            except StoreMissing as e:
                raise StoreMissing(e.location, hint=MISSING_STORE_HINT) from None
            if self._store.created and active_format() is None:  # else the store's log line says it
                click.echo(f"host-engine: created a new store at {store_location(self._store.url)}", err=True)
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
            click.echo(error_line(f"host-engine: error: {e}", "host_engine"), err=True)
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
@click.version_option(package_name="droplet-live-migration", prog_name="host-engine")
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
    if db is not None and (not db.strip() or "\0" in db):
        raise InvalidInput(f"--db must be a path or a postgresql:// URL, got {db!r}", field="db")
    deps.db = db
    deps.config = load_config(config_path, env={}, overrides=overrides)
    if verbose:  # journal lines under systemd, else text (`run --log-format` picks for the daemon)
        setup_logging(LogFormat.AUTO, logging.DEBUG if verbose > 1 else logging.INFO, replace_foreign=False)
    ctx.call_on_close(deps.close)


@cli.command()
@pass_deps
def init(deps: Deps) -> None:
    """Create the store (a SQLite file, or the tables in a PostgreSQL database) if there is none, and upgrade
    an older schema; an up-to-date store is left as it is."""
    store = deps.store(create=True)
    where = store_location(store.url)
    version = store.schema_version()
    click.echo(f"store {'created' if store.created else 'ready'} at {where} (schema version {version})")


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


def _strict(doc: object) -> object:
    """``doc`` with every NaN or infinity (a recorded rate or ETA can be one) as null: ``--json`` output is
    standard JSON that jq and every strict parser read, never Python's ``NaN``/``Infinity``."""
    if isinstance(doc, float):
        return doc if math.isfinite(doc) else None
    if isinstance(doc, dict):
        return {k: _strict(v) for k, v in doc.items()}
    if isinstance(doc, list | tuple):
        return [_strict(v) for v in doc]
    return doc


def _json(doc: object) -> None:
    click.echo(json.dumps(_strict(doc), indent=2, sort_keys=True, default=str, allow_nan=False))


def _json_line(doc: object) -> None:
    """One JSON document on one line (streams: ``migrate --now --json``, ``status --watch --json``)."""
    click.echo(json.dumps(_strict(doc), sort_keys=True, default=str, separators=(",", ":"), allow_nan=False))


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


def _client_factory(deps: Deps) -> ClientFactory:
    from host_engine.wiring import client_factory  # the engine's modules load only for commands that use them

    return client_factory(deps.config, sleep=deps.sleep)


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
