"""Opening a store's database: paths and URLs, the engine's connection settings, and schema upgrades."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event

from host_engine import schema as t
from host_engine.errors import NotFound, StoreError
from host_engine.timeparse import Clock, utc_now

log = logging.getLogger(__name__)

DB_ENV = "HOST_ENGINE_DB"
# Seconds to establish a PostgreSQL connection (libpq's connect_timeout) before it counts as an outage.
PG_CONNECT_TIMEOUT_S = 5


def default_db_path() -> Path:
    """``$XDG_STATE_HOME/host-engine/engine.db`` (``~/.local/state/...`` when unset)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "host-engine" / "engine.db"


def database_url(target: str | os.PathLike[str]) -> str:
    """A SQLAlchemy URL for a path or URL. ``postgresql://`` gets the psycopg 3 driver."""
    text = os.fspath(target)
    if "://" in text:
        for prefix in ("postgresql://", "postgres://"):
            if text.startswith(prefix):
                return "postgresql+psycopg://" + text[len(prefix) :]
        return text
    path = Path(text).expanduser().resolve()
    return f"sqlite:///{path}"


def redact_url(url: str) -> str:
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "<unparseable url>"


def create_db_engine(url: str) -> sa.Engine:
    """An engine with the settings the store relies on (FK checks, write locks, pre-ping)."""
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError as e:
        raise StoreError(f"not a database URL: {url!r}") from e
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy's "begin" event issue BEGIN itself (pysqlite's own handling defers it too late).
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            if parsed.database and parsed.database != ":memory:":
                cur.execute("PRAGMA journal_mode=WAL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: sa.Connection) -> None:
            # Writers take the lock up front: read-check-write sequences cannot interleave between processes.
            mode = "DEFERRED" if conn.get_execution_options().get("readonly") else "IMMEDIATE"
            conn.exec_driver_sql(f"BEGIN {mode}")

        return engine
    try:
        # A database host that drops packets must fail a connection in seconds, not after TCP's two minutes:
        # the engine's loops ride an outage out by retrying, and SIGTERM must not wait on a connect.
        return sa.create_engine(
            url, pool_pre_ping=True, connect_args={"connect_timeout": PG_CONNECT_TIMEOUT_S}
        )
    except (ImportError, sa.exc.ArgumentError) as e:
        raise StoreError(f"cannot use database {redact_url(url)}: {e}") from e


def ensure_schema(engine: sa.Engine, *, clock: Clock = utc_now) -> int:
    """Create or upgrade the schema to :data:`schema.LATEST_VERSION`; return the version now in force."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Two processes opening a fresh database at once must not both create the tables.
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(7412001)"))
        t.schema_version.create(conn, checkfirst=True)
        current = conn.execute(sa.select(sa.func.max(t.schema_version.c.version))).scalar() or 0
        if current > t.LATEST_VERSION:
            raise StoreError(
                f"the database has schema version {current}, newer than this host-engine knows "
                f"({t.LATEST_VERSION}); upgrade host-engine"
            )
        for version in range(current + 1, t.LATEST_VERSION + 1):
            description, step = t.SCHEMA_STEPS[version]
            step(conn)
            conn.execute(
                t.schema_version.insert().values(version=version, applied_at=clock(), description=description)
            )
            log.info("store schema upgraded to version %s (%s)", version, description)
        return t.LATEST_VERSION


class StoreMissing(NotFound):
    """There is no store at the path or URL (and the caller asked not to create one)."""

    def __init__(self, location: str, *, hint: str = "") -> None:
        super().__init__(f"no store at {location}" + (f" ({hint})" if hint else ""))
        self.location = location


def store_location(url: str) -> str:
    """Where a store is, for people: a SQLite file's path, or the URL without its password."""
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError:
        return "<unparseable url>"
    if parsed.get_backend_name() == "sqlite" and parsed.database:
        return parsed.database
    return redact_url(url)


def sqlite_file_missing(url: str) -> bool:
    """Whether ``url`` names a SQLite file that does not exist (opening it would create it)."""
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError:
        return False  # create_db_engine says what is wrong with it
    if parsed.get_backend_name() != "sqlite":
        return False
    return not parsed.database or parsed.database == ":memory:" or not Path(parsed.database).exists()


def first_line(e: BaseException) -> str:
    text = str(getattr(e, "orig", None) or e)
    return text.strip().splitlines()[0] if text.strip() else type(e).__name__
