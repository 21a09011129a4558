"""The host-engine CLI run in-process, for the unit tests that drive the executor through it.

:func:`invoke` runs ``host-engine --db DB ARGS`` through click's ``CliRunner`` with the test's fake clock as the
time, its ``sleep`` as the CLI's sleep (nothing sleeps for real), the simulated hypervisor's wall clock tied
to it (``conftest.wall``) and a metadata client that tries once and never sleeps. :func:`ok` also asserts
exit 0; :func:`one_error` checks a result is the one line a user sees for a mistake; :func:`snapshot` reads
every table a refused command must leave as it was, and :func:`only_migration` the store's one migration.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from click.testing import CliRunner, Result

from host_engine import schema
from host_engine.cli import Deps, cli
from host_engine.metadata.reconcile import default_client_factory
from host_engine.models import Migration
from host_engine.store import Store
from tests.unit.host_engine.conftest import FakeClock, wall

ERROR_PREFIX = "host-engine: error: "


def invoke(
    db: str,
    clock: FakeClock,
    *args: str,
    sleep: Callable[[float], None] | None = None,
    tty: bool | None = False,
) -> Result:
    """``host-engine --db DB ARGS`` on ``clock``; ``sleep`` replaces the clock's own (a test that ticks a
    worker while the CLI waits), ``tty`` says whether stdout is a terminal."""
    deps = Deps(
        clock=clock,
        user="tester",
        install_signals=False,
        sleep=sleep or clock.sleep,
        monotonic=lambda: wall(clock),
        client_factory=default_client_factory(attempts=1, sleep=lambda s: None),
        tty=tty,
    )
    return CliRunner().invoke(cli, ["--db", db, *args], obj=deps, catch_exceptions=False)


def ok(
    db: str,
    clock: FakeClock,
    *args: str,
    sleep: Callable[[float], None] | None = None,
    tty: bool | None = False,
) -> Result:
    """:func:`invoke`, asserting the command exited 0."""
    r = invoke(db, clock, *args, sleep=sleep, tty=tty)
    assert r.exit_code == 0, (args, r.output, r.stderr)
    return r


def one_error(r: Result, code: int, message: str) -> None:
    """``r`` exited ``code`` with one line on stderr, ``host-engine: error: ...`` holding ``message``."""
    assert r.exit_code == code, (r.output, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(ERROR_PREFIX) and message in lines[0], lines[0]


def snapshot(db: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the tables a command may write (hosts, droplets, migrations, their log, the sim world)."""
    store = Store.open(db)
    out = {}
    with store.engine.connect() as conn:
        for table in (
            schema.hosts,
            schema.droplets,
            schema.migrations,
            schema.migration_log,
            schema.sim_world,
        ):
            out[table.name] = [tuple(r) for r in conn.execute(sa.select(table))]
    store.close()
    return out


def only_migration(db: str) -> Migration:
    """The store's one migration (fails if there are none or several)."""
    store = Store.open(db)
    try:
        [m] = store.list_migrations()
        return m
    finally:
        store.close()
