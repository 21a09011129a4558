"""The engine's store (DESIGN.md §9): SQLite by default, PostgreSQL by URL, one schema for both.

Use::

    store = Store.open("/var/lib/host-engine/engine.db")   # or "postgresql://user@host/db"
    store.add_host(Host(...))
    with store.begin() as tx:              # one transaction; everything in it commits or nothing does
        tx.set_host_state("hv1", HostState.MAINTENANCE, reason="disk swap", by="alice")
        tx.create_migration(NewMigration(...))

Every state change of a migration goes through :meth:`Tx.transition`, which locks the row (``FOR UPDATE``;
on SQLite every write transaction is ``BEGIN IMMEDIATE``), checks the transition table, writes the new state
and appends to ``migration_log`` in the same transaction. Workers claim due migrations with
:meth:`Tx.claim` (``FOR UPDATE SKIP LOCKED`` on PostgreSQL) so no migration runs twice.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event

from host_engine import schema as t
from host_engine.errors import Conflict, HostEngineError, NotFound, StaleClaim, StoreError
from host_engine.models import Droplet, Host, LogEntry, Migration, NewMigration
from host_engine.states import ACTIVE_STATES, HostState, MigrationState, check_transition
from host_engine.timeparse import Clock, utc_now

log = logging.getLogger(__name__)

DB_ENV = "HOST_ENGINE_DB"
# Seconds to establish a PostgreSQL connection (libpq's connect_timeout) before it counts as an outage.
PG_CONNECT_TIMEOUT_S = 5
DEFAULT_CLAIM_LEASE_S = 300.0

#: Migration columns a caller may change (with or without a state change).
#: ``state`` changes only by transition.
UPDATABLE_MIGRATION_FIELDS = frozenset(
    {
        "target_host",
        "event_id",
        "not_before",
        "notice_at",
        "notified_at",
        "deadline",
        "attempt",
        "max_attempts",
        "offline",
        "power_on_after",
        "ack",
        "claimed_by",
        "claimed_at",
        "started_at",
        "finished_at",
        "event_cleared_at",
        "last_error",
        "stats",
        "reason",
    }
)
_ACTIVE_VALUES = tuple(s.value for s in ACTIVE_STATES)
_RUNNING_VALUES = (MigrationState.RUNNING.value, MigrationState.OFFLINE_RUNNING.value)
#: pg_advisory_xact_lock keys: 7412001 schema changes, 7412002 planners, 7412003 claims.
CLAIM_LOCK_KEY = 7412003


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


def new_migration_id() -> str:
    return "m-" + secrets.token_hex(5)


def live_event_id(migration_id: str) -> str:
    """The event id the guest sees for the live migration (kept across retries)."""
    return f"{migration_id}-live"


def offline_event_id(migration_id: str) -> str:
    """A NEW event id for the offline path (DESIGN.md §3)."""
    return f"{migration_id}-offline"


@dataclass(frozen=True)
class Usage:
    """Resources committed to a host: droplets on it plus active migrations heading to it."""

    vcpus: int = 0
    memory_bytes: int = 0
    disk_bytes: int = 0
    droplets: int = 0

    def plus(self, vcpus: int, memory_bytes: int, disk_bytes: int) -> Usage:
        return Usage(
            self.vcpus + vcpus,
            self.memory_bytes + memory_bytes,
            self.disk_bytes + disk_bytes,
            self.droplets + 1,
        )


@dataclass(frozen=True)
class ClaimLimits:
    """How many migrations may run at once (``[concurrency]``), enforced when a claim is taken, across every
    worker on the store (DESIGN.md §9). None: no limit of that kind."""

    max_parallel: int | None = None
    max_per_source: int | None = None
    max_per_target: int | None = None


@dataclass(frozen=True)
class RunningCounts:
    """Migrations running now: fleet-wide, out of each source, into each target."""

    total: int
    by_source: Mapping[str, int]
    by_target: Mapping[str, int]

    def full_sources(self, limits: ClaimLimits) -> set[str]:
        cap = limits.max_per_source
        return set() if cap is None else {h for h, n in self.by_source.items() if n >= cap}

    def full_targets(self, limits: ClaimLimits) -> set[str]:
        cap = limits.max_per_target
        return set() if cap is None else {h for h, n in self.by_target.items() if n >= cap}

    def blocked(self, limits: ClaimLimits, source: str, target: str) -> str | None:
        """Why one more migration from ``source`` to ``target`` would exceed a limit; None if it would not."""
        if limits.max_parallel is not None and self.total >= limits.max_parallel:
            return f"{self.total} running fleet-wide (max_parallel {limits.max_parallel})"
        if source in self.full_sources(limits):
            n, cap = self.by_source[source], limits.max_per_source
            return f"{n} running out of {source} (max_per_source {cap})"
        if target in self.full_targets(limits):
            n, cap = self.by_target[target], limits.max_per_target
            return f"{n} running into {target} (max_per_target {cap})"
        return None


def _host(row: sa.RowMapping) -> Host:
    return Host(
        name=row["name"],
        datacenter=row["datacenter"],
        vcpus=row["vcpus"],
        memory_bytes=row["memory_bytes"],
        disk_bytes=row["disk_bytes"],
        compat_group=row["compat_group"],
        state=HostState(row["state"]),
        hypervisor_uri=row["hypervisor_uri"],
        metadata_url=row["metadata_url"],
        metadata_token_file=row["metadata_token_file"],
        state_reason=row["state_reason"],
        state_changed_by=row["state_changed_by"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _droplet(row: sa.RowMapping) -> Droplet:
    return Droplet(
        id=row["id"],
        host=row["host"],
        vcpus=row["vcpus"],
        memory_bytes=row["memory_bytes"],
        disk_bytes=row["disk_bytes"],
        owner_tag=row["owner_tag"],
        addresses=tuple(row["addresses"] or ()),
        hostname=row["hostname"],
        power_state=row["power_state"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _migration(row: sa.RowMapping) -> Migration:
    return Migration(
        id=row["id"],
        droplet_id=row["droplet_id"],
        source_host=row["source_host"],
        target_host=row["target_host"],
        state=MigrationState(row["state"]),
        event_id=row["event_id"],
        not_before=row["not_before"],
        notice_at=row["notice_at"],
        deadline=row["deadline"],
        notified_at=row["notified_at"],
        attempt=row["attempt"],
        max_attempts=row["max_attempts"],
        reason=row["reason"],
        requested_by=row["requested_by"],
        offline=bool(row["offline"]),
        power_on_after=bool(row["power_on_after"]),
        ack=row["ack"],
        claimed_by=row["claimed_by"],
        claimed_at=row["claimed_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        event_cleared_at=row["event_cleared_at"],
        last_error=row["last_error"],
        stats=dict(row["stats"] or {}),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _log_entry(row: sa.RowMapping) -> LogEntry:
    return LogEntry(
        id=row["id"],
        migration_id=row["migration_id"],
        droplet_id=row["droplet_id"],
        at=row["at"],
        kind=row["kind"],
        from_state=MigrationState(row["from_state"]) if row["from_state"] else None,
        to_state=MigrationState(row["to_state"]) if row["to_state"] else None,
        message=row["message"],
        data=dict(row["data"] or {}),
    )


class Tx:
    """The store's operations inside one open transaction. Get one from :meth:`Store.begin`.

    ``now`` is read once per transaction (on first use), so every row it writes carries the same time. On
    PostgreSQL with the default clock it is the database's ``now()``: claims, leases and due times compare
    times from ONE clock however many machines run workers (DESIGN.md §9). An injected clock (tests) or
    SQLite (one machine) uses the store's clock.
    """

    def __init__(
        self, conn: sa.Connection, now: datetime | Callable[[], datetime], *, db_clock: bool = False
    ) -> None:
        self.conn = conn
        #: ``now`` is the database server's clock (PostgreSQL, no injected clock).
        self.db_clock = db_clock
        self._now: datetime | None = now if isinstance(now, datetime) else None
        self._now_fn: Callable[[], datetime] | None = None if isinstance(now, datetime) else now

    @property
    def now(self) -> datetime:
        if self._now is None:
            self._now = self._now_fn() if self._now_fn is not None else utc_now()
        return self._now

    @property
    def postgres(self) -> bool:
        return self.conn.dialect.name == "postgresql"

    def lock_planner(self) -> None:
        """Serialize planners: two plans must not both count the same free room.

        PostgreSQL: a transaction-scoped advisory lock. SQLite: every write transaction already holds the
        database's write lock (``BEGIN IMMEDIATE``).
        """
        if self.conn.dialect.name == "postgresql":
            self.conn.execute(sa.text("SELECT pg_advisory_xact_lock(7412002)"))

    # ---- hosts -------------------------------------------------------------------------------------------

    def add_host(self, host: Host) -> Host:
        if self._host_row(host.name) is not None:
            raise Conflict(f"host {host.name!r} already exists")
        self.conn.execute(
            t.hosts.insert().values(
                name=host.name,
                datacenter=host.datacenter,
                compat_group=host.compat_group,
                vcpus=host.vcpus,
                memory_bytes=host.memory_bytes,
                disk_bytes=host.disk_bytes,
                state=host.state.value,
                hypervisor_uri=host.hypervisor_uri,
                metadata_url=host.metadata_url,
                metadata_token_file=host.metadata_token_file,
                state_reason=host.state_reason,
                state_changed_by=host.state_changed_by,
                created_at=self.now,
                updated_at=self.now,
            )
        )
        return self.get_host(host.name)

    def _host_row(self, name: str, *, for_update: bool = False) -> sa.RowMapping | None:
        q = sa.select(t.hosts).where(t.hosts.c.name == name)
        if for_update:
            q = q.with_for_update()
        row = self.conn.execute(q).mappings().first()
        return row

    def get_host(self, name: str, *, for_update: bool = False) -> Host:
        row = self._host_row(name, for_update=for_update)
        if row is None:
            raise NotFound(f"unknown host {name!r}")
        return _host(row)

    def list_hosts(self, *, datacenter: str | None = None) -> list[Host]:
        q = sa.select(t.hosts).order_by(t.hosts.c.name)
        if datacenter is not None:
            q = q.where(t.hosts.c.datacenter == datacenter)
        return [_host(r) for r in self.conn.execute(q).mappings()]

    def update_host(self, name: str, **changes: Any) -> Host:
        """Change a host's fields (not its name). ``state`` takes a :class:`HostState`."""
        self.get_host(name, for_update=True)
        allowed = {c.name for c in t.hosts.columns} - {"name", "created_at", "updated_at"}
        unknown = set(changes) - allowed
        if unknown:
            raise ValueError(f"unknown host fields: {sorted(unknown)}")
        values = {k: (v.value if hasattr(v, "value") else v) for k, v in changes.items()}
        self.conn.execute(
            t.hosts.update().where(t.hosts.c.name == name).values(**values, updated_at=self.now)
        )
        return self.get_host(name)

    def set_host_state(self, name: str, state: Any, *, reason: str = "", by: str = "") -> Host:
        return self.update_host(name, state=state, state_reason=reason, state_changed_by=by)

    # ---- droplets ----------------------------------------------------------------------------------------

    def add_droplet(self, droplet: Droplet) -> Droplet:
        self.get_host(droplet.host)
        if self._droplet_row(droplet.id) is not None:
            raise Conflict(f"droplet {droplet.id!r} already exists")
        self.conn.execute(
            t.droplets.insert().values(
                id=droplet.id,
                host=droplet.host,
                vcpus=droplet.vcpus,
                memory_bytes=droplet.memory_bytes,
                disk_bytes=droplet.disk_bytes,
                owner_tag=droplet.owner_tag,
                addresses=list(droplet.addresses),
                hostname=droplet.hostname,
                power_state=droplet.power_state,
                created_at=self.now,
                updated_at=self.now,
            )
        )
        return self.get_droplet(droplet.id)

    def _droplet_row(self, droplet_id: str, *, for_update: bool = False) -> sa.RowMapping | None:
        q = sa.select(t.droplets).where(t.droplets.c.id == droplet_id)
        if for_update:
            q = q.with_for_update()
        return self.conn.execute(q).mappings().first()

    def get_droplet(self, droplet_id: str, *, for_update: bool = False) -> Droplet:
        row = self._droplet_row(droplet_id, for_update=for_update)
        if row is None:
            raise NotFound(f"unknown droplet {droplet_id!r}")
        return _droplet(row)

    def list_droplets(self, *, host: str | None = None) -> list[Droplet]:
        q = sa.select(t.droplets).order_by(t.droplets.c.id)
        if host is not None:
            q = q.where(t.droplets.c.host == host)
        return [_droplet(r) for r in self.conn.execute(q).mappings()]

    def update_droplet(self, droplet_id: str, **changes: Any) -> Droplet:
        """Change a droplet's size, tags, addresses or power state. Its host changes only by a migration."""
        self.get_droplet(droplet_id, for_update=True)
        allowed = {"vcpus", "memory_bytes", "disk_bytes", "owner_tag", "addresses", "hostname", "power_state"}
        unknown = set(changes) - allowed
        if unknown:
            raise ValueError(f"unknown or read-only droplet fields: {sorted(unknown)}")
        if "addresses" in changes:
            changes["addresses"] = list(changes["addresses"])
        self.conn.execute(
            t.droplets.update().where(t.droplets.c.id == droplet_id).values(**changes, updated_at=self.now)
        )
        return self.get_droplet(droplet_id)

    def usage_by_host(self) -> dict[str, Usage]:
        """Committed resources per host: its droplets, plus active migrations targeting it.

        A droplet leaving a host still counts there until its migration completes (it still runs there).
        """
        usage: dict[str, Usage] = {}
        d = t.droplets
        on_host = sa.select(
            d.c.host,
            sa.func.sum(d.c.vcpus),
            sa.func.sum(d.c.memory_bytes),
            sa.func.sum(d.c.disk_bytes),
            sa.func.count(),
        ).group_by(d.c.host)
        for host, vcpus, mem, disk, count in self.conn.execute(on_host):
            usage[host] = Usage(int(vcpus or 0), int(mem or 0), int(disk or 0), int(count))
        m = t.migrations
        incoming = (
            sa.select(
                m.c.target_host,
                sa.func.sum(d.c.vcpus),
                sa.func.sum(d.c.memory_bytes),
                sa.func.sum(d.c.disk_bytes),
                sa.func.count(),
            )
            .select_from(m.join(d, d.c.id == m.c.droplet_id))
            .where(m.c.state.in_(_ACTIVE_VALUES))
            .group_by(m.c.target_host)
        )
        for host, vcpus, mem, disk, count in self.conn.execute(incoming):
            u = usage.get(host, Usage())
            usage[host] = Usage(
                u.vcpus + int(vcpus or 0),
                u.memory_bytes + int(mem or 0),
                u.disk_bytes + int(disk or 0),
                u.droplets + int(count),
            )
        return usage

    def owner_tags_by_host(self, only: Iterable[str] | None = None) -> dict[str, set[str]]:
        """Owner tags present on each host, counting droplets on their way to it.

        ``only``: just these tags (placement only needs the tags of the droplets it places).
        """
        tags: dict[str, set[str]] = {}
        d = t.droplets
        wanted = None if only is None else sorted({tag for tag in only if tag})
        if wanted is not None and not wanted:
            return tags
        q = sa.select(d.c.host, d.c.owner_tag).where(d.c.owner_tag != "").distinct()
        if wanted is not None:
            q = q.where(d.c.owner_tag.in_(wanted))
        for host, tag in self.conn.execute(q):
            tags.setdefault(host, set()).add(tag)
        m = t.migrations
        q2 = (
            sa.select(m.c.target_host, d.c.owner_tag)
            .select_from(m.join(d, d.c.id == m.c.droplet_id))
            .where(m.c.state.in_(_ACTIVE_VALUES), d.c.owner_tag != "")
            .distinct()
        )
        if wanted is not None:
            q2 = q2.where(d.c.owner_tag.in_(wanted))
        for host, tag in self.conn.execute(q2):
            tags.setdefault(host, set()).add(tag)
        return tags

    # ---- migrations --------------------------------------------------------------------------------------

    def create_migration(
        self, new: NewMigration, *, migration_id: str | None = None, message: str = ""
    ) -> Migration:
        """Insert a ``planned`` migration and its first log line. The droplet must not be migrating yet."""
        droplet = self.get_droplet(new.droplet_id, for_update=True)
        if droplet.host != new.source_host:
            raise Conflict(f"droplet {new.droplet_id!r} is on {droplet.host!r}, not {new.source_host!r}")
        if new.source_host == new.target_host:
            raise Conflict(f"droplet {new.droplet_id!r}: target is the source host {new.source_host!r}")
        self.get_host(new.target_host)
        busy = self.active_migration_for(new.droplet_id)
        if busy is not None:
            raise Conflict(f"droplet {new.droplet_id!r} already has migration {busy.id} ({busy.state.value})")
        mid = migration_id or new_migration_id()
        self.conn.execute(
            t.migrations.insert().values(
                id=mid,
                droplet_id=new.droplet_id,
                source_host=new.source_host,
                target_host=new.target_host,
                state=MigrationState.PLANNED.value,
                event_id=live_event_id(mid),
                not_before=new.not_before,
                notice_at=new.notice_at,
                deadline=new.deadline,
                attempt=0,
                max_attempts=new.max_attempts,
                reason=new.reason,
                requested_by=new.requested_by,
                offline=new.offline,
                power_on_after=new.power_on_after,
                stats=dict(new.stats),
                created_at=self.now,
                updated_at=self.now,
            )
        )
        self.append_log(
            mid,
            "transition",
            message or f"planned {new.source_host} -> {new.target_host}",
            to_state=MigrationState.PLANNED,
            droplet_id=new.droplet_id,
            data={"requested_by": new.requested_by, "reason": new.reason},
        )
        return self.get_migration(mid)

    def _migration_row(self, migration_id: str, *, for_update: bool = False) -> sa.RowMapping | None:
        q = sa.select(t.migrations).where(t.migrations.c.id == migration_id)
        if for_update:
            q = q.with_for_update()
        return self.conn.execute(q).mappings().first()

    def get_migration(self, migration_id: str, *, for_update: bool = False) -> Migration:
        row = self._migration_row(migration_id, for_update=for_update)
        if row is None:
            raise NotFound(f"unknown migration {migration_id!r}")
        return _migration(row)

    def active_migration_for(self, droplet_id: str) -> Migration | None:
        q = sa.select(t.migrations).where(
            t.migrations.c.droplet_id == droplet_id, t.migrations.c.state.in_(_ACTIVE_VALUES)
        )
        row = self.conn.execute(q).mappings().first()
        return _migration(row) if row is not None else None

    def list_migrations(
        self,
        *,
        states: Iterable[MigrationState] | None = None,
        host: str | None = None,
        source_host: str | None = None,
        target_host: str | None = None,
        droplet_id: str | None = None,
        due_notice_by: datetime | None = None,
        pending_event_clear: bool = False,
        limit: int | None = None,
    ) -> list[Migration]:
        """Migrations matching every filter given, ordered by ``not_before`` then id.

        ``host`` matches either end; ``due_notice_by`` keeps those whose ``notice_at`` is at or before it;
        ``pending_event_clear`` those whose guest was notified and whose event is not recorded as cleared.
        """
        m = t.migrations
        q = sa.select(m).order_by(m.c.not_before, m.c.id)
        if states is not None:
            q = q.where(m.c.state.in_([s.value for s in states]))
        if host is not None:
            q = q.where(sa.or_(m.c.source_host == host, m.c.target_host == host))
        if source_host is not None:
            q = q.where(m.c.source_host == source_host)
        if target_host is not None:
            q = q.where(m.c.target_host == target_host)
        if droplet_id is not None:
            q = q.where(m.c.droplet_id == droplet_id)
        if due_notice_by is not None:
            q = q.where(m.c.notice_at <= due_notice_by)
        if pending_event_clear:
            q = q.where(m.c.notified_at.is_not(None), m.c.event_cleared_at.is_(None))
        if limit is not None:
            q = q.limit(limit)
        return [_migration(r) for r in self.conn.execute(q).mappings()]

    def transition(
        self,
        migration_id: str,
        to_state: MigrationState,
        *,
        message: str = "",
        worker: str | None = None,
        expect: MigrationState | Iterable[MigrationState] | None = None,
        data: Mapping[str, Any] | None = None,
        **changes: Any,
    ) -> Migration:
        """Move a migration to ``to_state`` (checked against the transition table) and log it.

        ``changes`` sets other columns in the same write (see :data:`UPDATABLE_MIGRATION_FIELDS`).
        ``worker``: the caller's claim must hold (else :class:`StaleClaim`).
        ``expect``: the current state must be one of these (else :class:`Conflict`), a compare-and-set for
        callers that decided on an earlier read.
        """
        row = self._migration_row(migration_id, for_update=True)
        if row is None:
            raise NotFound(f"unknown migration {migration_id!r}")
        current = MigrationState(row["state"])
        if expect is not None:
            allowed = {expect} if isinstance(expect, MigrationState) else set(expect)
            if current not in allowed:
                wanted = "/".join(sorted(s.value for s in allowed))
                raise Conflict(f"migration {migration_id} is {current.value}, expected {wanted}")
        if worker is not None and row["claimed_by"] != worker:
            raise StaleClaim(f"migration {migration_id} is claimed by {row['claimed_by']!r}, not {worker!r}")
        check_transition(migration_id, current, to_state)
        values = self._checked_changes(changes)
        if to_state.is_terminal:
            values.setdefault("finished_at", self.now)
            values.setdefault("claimed_by", None)
            values.setdefault("claimed_at", None)
        result = self.conn.execute(
            t.migrations.update()
            .where(t.migrations.c.id == migration_id, t.migrations.c.state == current.value)
            .values(state=to_state.value, updated_at=self.now, **values)
        )
        if result.rowcount != 1:  # another writer got there first (only possible without row locks)
            raise Conflict(f"migration {migration_id} changed concurrently")
        self.append_log(
            migration_id,
            "transition",
            message or f"{current.value} -> {to_state.value}",
            from_state=current,
            to_state=to_state,
            droplet_id=row["droplet_id"],
            data=data,
        )
        return self.get_migration(migration_id)

    def update_migration(
        self, migration_id: str, *, message: str = "", log_kind: str = "update", **changes: Any
    ) -> Migration:
        """Change columns without a state change; logged when ``message`` is given."""
        row = self._migration_row(migration_id, for_update=True)
        if row is None:
            raise NotFound(f"unknown migration {migration_id!r}")
        values = self._checked_changes(changes)
        self.conn.execute(
            t.migrations.update()
            .where(t.migrations.c.id == migration_id)
            .values(updated_at=self.now, **values)
        )
        if message:
            self.append_log(migration_id, log_kind, message, droplet_id=row["droplet_id"])
        return self.get_migration(migration_id)

    @staticmethod
    def _checked_changes(changes: Mapping[str, Any]) -> dict[str, Any]:
        unknown = set(changes) - UPDATABLE_MIGRATION_FIELDS
        if unknown:
            raise ValueError(f"not updatable migration fields: {sorted(unknown)}")
        values = dict(changes)
        if "stats" in values:
            values["stats"] = dict(values["stats"])
        return values

    def claim(
        self,
        worker: str,
        *,
        states: Iterable[MigrationState] = (MigrationState.NOTIFIED,),
        due_by: datetime | None = None,
        lease_s: float = DEFAULT_CLAIM_LEASE_S,
        limit: int = 1,
        migration_id: str | None = None,
        include_own: bool = False,
    ) -> list[Migration]:
        """Claim up to ``limit`` migrations in ``states`` whose ``not_before`` is at or before ``due_by``.

        Unclaimed rows, or rows whose claim is older than ``lease_s`` (a dead worker), qualify. Rows another
        transaction holds are skipped (``SKIP LOCKED``), so concurrent workers never claim the same migration.
        The state does not change; the caller transitions it next with ``worker=`` to prove its claim.
        ``include_own`` also returns rows this worker already holds (a restarted worker taking its work back).
        """
        m = t.migrations
        stale_before = self.stale_before(lease_s)
        eligible: list[sa.ColumnElement[bool]] = [m.c.claimed_by.is_(None)]
        if stale_before is not None:
            eligible.append(m.c.claimed_at < stale_before)
        if include_own:
            eligible.append(m.c.claimed_by == worker)
        q = (
            sa.select(m.c.id, m.c.droplet_id, m.c.claimed_by)
            .where(
                m.c.state.in_([s.value for s in states]),
                sa.or_(*eligible),
            )
            .order_by(m.c.not_before, m.c.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        if due_by is not None:
            q = q.where(m.c.not_before <= due_by)
        if migration_id is not None:
            q = q.where(m.c.id == migration_id)
        rows = self.conn.execute(q).all()
        claimed = []
        for mid, droplet_id, previous in rows:
            self.conn.execute(
                m.update()
                .where(m.c.id == mid)
                .values(claimed_by=worker, claimed_at=self.now, updated_at=self.now)
            )
            note = f"claimed by {worker}" + (
                f" (lease of {previous} expired)" if previous not in (None, worker) else ""
            )
            self.append_log(mid, "claim", note, droplet_id=droplet_id, data={"worker": worker})
            claimed.append(self.get_migration(mid))
        return claimed

    # ---- claims under the fleet's limits, leases ---------------------------------------------------------

    def lock_claims(self) -> None:
        """Serialize claims fleet-wide for the rest of the transaction, so counting what runs and claiming one
        more is one step across every worker. PostgreSQL: a transaction-scoped advisory lock. SQLite: every
        write transaction already holds the database's write lock (``BEGIN IMMEDIATE``)."""
        if self.postgres:
            self.conn.execute(sa.text(f"SELECT pg_advisory_xact_lock({CLAIM_LOCK_KEY})"))

    def stale_before(self, lease_s: float) -> datetime | None:
        """Claims renewed before this time have expired (their worker is presumed dead); None: none have.

        On PostgreSQL a database that (re)started less than a lease ago expires nothing: while it was down no
        worker could renew, so every claim gets a full lease from the restart before another worker may take
        it over (a store outage must not hand live attempts around)."""
        cutoff = self.now - timedelta(seconds=lease_s)
        if self.db_clock:
            started = self.conn.execute(sa.text("SELECT pg_postmaster_start_time()")).scalar_one()
            if started > cutoff:
                return None
        return cutoff

    def running_counts(self) -> RunningCounts:
        """Migrations running now (live or offline copy, whoever holds them), fleet-wide, per source and per
        target: what the limits are checked against."""
        m = t.migrations
        q = (
            sa.select(m.c.source_host, m.c.target_host, sa.func.count())
            .where(m.c.state.in_(_RUNNING_VALUES))
            .group_by(m.c.source_host, m.c.target_host)
        )
        by_source: dict[str, int] = {}
        by_target: dict[str, int] = {}
        total = 0
        for source, target, n in self.conn.execute(q):
            by_source[source] = by_source.get(source, 0) + int(n)
            by_target[target] = by_target.get(target, 0) + int(n)
            total += int(n)
        return RunningCounts(total, by_source, by_target)

    def claim_candidates(
        self,
        *,
        lease_s: float,
        limits: ClaimLimits,
        limit: int,
        only: Iterable[str] | None = None,
        exclude: Iterable[str] = (),
    ) -> list[Migration]:
        """Migrations that could start now, oldest window first, at most ``limit``: ``notified`` or
        ``offline_required``, due (``not_before`` passed by the store's clock, or the guest acknowledged
        ``ready``), unclaimed or with an expired claim, and not out of a source or into a target already at
        its limit. A read: :meth:`claim_start` decides, under the claim lock."""
        if limit <= 0:
            return []
        m = t.migrations
        counts = self.running_counts()
        if limits.max_parallel is not None and counts.total >= limits.max_parallel:
            return []
        stale_before = self.stale_before(lease_s)
        free: list[sa.ColumnElement[bool]] = [m.c.claimed_by.is_(None)]
        if stale_before is not None:
            free.append(m.c.claimed_at < stale_before)
        q = (
            sa.select(m)
            .where(
                m.c.state.in_([MigrationState.NOTIFIED.value, MigrationState.OFFLINE_REQUIRED.value]),
                sa.or_(
                    m.c.not_before <= self.now,
                    sa.and_(m.c.state == MigrationState.NOTIFIED.value, m.c.ack == "ready"),
                ),
                sa.or_(*free),
            )
            .order_by(m.c.not_before, m.c.id)
            .limit(limit)
        )
        full_sources = counts.full_sources(limits)
        full_targets = counts.full_targets(limits)
        if full_sources:
            q = q.where(m.c.source_host.not_in(sorted(full_sources)))
        if full_targets:
            q = q.where(m.c.target_host.not_in(sorted(full_targets)))
        if only is not None:
            q = q.where(m.c.id.in_(sorted(only)))
        skip = sorted(exclude)
        if skip:
            q = q.where(m.c.id.not_in(skip))
        return [_migration(r) for r in self.conn.execute(q).mappings()]

    def claim_start(
        self,
        migration_id: str,
        worker: str,
        *,
        offline: bool,
        lease_s: float,
        limits: ClaimLimits,
        message: str = "",
    ) -> Migration | None:
        """Claim a due migration for ``worker`` and start its next attempt (``running``, or
        ``offline_running`` when ``offline``), in this one transaction, if that keeps every limit; else
        None (nothing written).

        Under the fleet-wide claim lock (:meth:`lock_claims`) it counts what runs and re-checks that the
        migration is still startable, so however many workers claim at once no limit is ever exceeded and no
        migration starts twice. Claim times are the store's clock (the database's on PostgreSQL)."""
        self.lock_claims()
        # Counted before ``now`` is first read: the claim's recorded time is after every end it counted.
        counts = self.running_counts()
        row = self._migration_row(migration_id, for_update=True)
        if row is None:
            raise NotFound(f"unknown migration {migration_id!r}")
        current = MigrationState(row["state"])
        if current not in (MigrationState.NOTIFIED, MigrationState.OFFLINE_REQUIRED):
            return None
        due = row["not_before"] <= self.now or (current is MigrationState.NOTIFIED and row["ack"] == "ready")
        stale_before = self.stale_before(lease_s)
        previous = row["claimed_by"]
        claimed_at = row["claimed_at"]
        expired = stale_before is not None and claimed_at is not None and claimed_at < stale_before
        free = previous is None or previous == worker or expired
        if not (due and free):
            return None
        blocked = counts.blocked(limits, row["source_host"], row["target_host"])
        if blocked is not None:
            log.debug("migration_id=%s not claimed: %s", migration_id, blocked)
            return None
        note = f"claimed by {worker}" + (
            f" (lease of {previous} expired)" if previous not in (None, worker) else ""
        )
        self.append_log(migration_id, "claim", note, droplet_id=row["droplet_id"], data={"worker": worker})
        attempt = int(row["attempt"]) + 1
        return self.transition(
            migration_id,
            MigrationState.OFFLINE_RUNNING if offline else MigrationState.RUNNING,
            message=message
            or f"attempt {attempt} ({'offline copy' if offline else 'live'}) "
            f"{row['source_host']} -> {row['target_host']} on {worker}",
            claimed_by=worker,
            claimed_at=self.now,
            attempt=attempt,
            offline=offline,
            started_at=self.now,
        )

    def renew_claims(self, worker: str, migration_ids: Iterable[str]) -> dict[str, Migration]:
        """Renew ``worker``'s claims on these migrations (one write); the ones it still holds, by id. An id
        missing from the answer was taken over (its lease expired) or finished by someone else."""
        ids = sorted(set(migration_ids))
        if not ids:
            return {}
        m = t.migrations
        self.conn.execute(
            m.update().where(m.c.id.in_(ids), m.c.claimed_by == worker).values(claimed_at=self.now)
        )
        q = sa.select(m).where(m.c.id.in_(ids), m.c.claimed_by == worker)
        return {r["id"]: _migration(r) for r in self.conn.execute(q).mappings()}

    def orphans(self, worker: str, *, lease_s: float) -> list[Migration]:
        """Running migrations nobody supervises: unclaimed, claimed by ``worker`` (this worker's previous
        process: the name is held by one live process at a time), or with an expired claim."""
        m = t.migrations
        stale_before = self.stale_before(lease_s)
        mine_or_free: list[sa.ColumnElement[bool]] = [m.c.claimed_by.is_(None), m.c.claimed_by == worker]
        if stale_before is not None:
            mine_or_free.append(m.c.claimed_at < stale_before)
        q = sa.select(m).where(m.c.state.in_(_RUNNING_VALUES), sa.or_(*mine_or_free)).order_by(m.c.id)
        return [_migration(r) for r in self.conn.execute(q).mappings()]

    def renew_claim(self, migration_id: str, worker: str) -> Migration:
        m = self.get_migration(migration_id, for_update=True)
        if m.claimed_by != worker:
            raise StaleClaim(f"migration {migration_id} is claimed by {m.claimed_by!r}, not {worker!r}")
        self.conn.execute(
            t.migrations.update().where(t.migrations.c.id == migration_id).values(claimed_at=self.now)
        )
        return self.get_migration(migration_id)

    def release_claim(self, migration_id: str, worker: str) -> Migration:
        m = self.get_migration(migration_id, for_update=True)
        if m.claimed_by != worker:
            raise StaleClaim(f"migration {migration_id} is claimed by {m.claimed_by!r}, not {worker!r}")
        self.conn.execute(
            t.migrations.update()
            .where(t.migrations.c.id == migration_id)
            .values(claimed_by=None, claimed_at=None, updated_at=self.now)
        )
        self.append_log(migration_id, "release", f"released by {worker}", droplet_id=m.droplet_id)
        return self.get_migration(migration_id)

    def complete(
        self,
        migration_id: str,
        *,
        worker: str | None = None,
        stats: Mapping[str, Any] | None = None,
        message: str = "",
    ) -> Migration:
        """Switch the droplet's host to the target AND mark the migration ``completed``, atomically."""
        m = self.get_migration(migration_id, for_update=True)
        droplet = self.get_droplet(m.droplet_id, for_update=True)
        if droplet.host != m.source_host:
            raise Conflict(
                f"droplet {droplet.id} is on {droplet.host}, migration {m.id} moves it from {m.source_host}"
            )
        self.conn.execute(
            t.droplets.update()
            .where(t.droplets.c.id == droplet.id)
            .values(host=m.target_host, updated_at=self.now)
        )
        changes: dict[str, Any] = {}
        if stats is not None:
            changes["stats"] = {**m.stats, **stats}
        return self.transition(
            migration_id,
            MigrationState.COMPLETED,
            worker=worker,
            message=message or f"completed: {droplet.id} now on {m.target_host}",
            **changes,
        )

    # ---- log ---------------------------------------------------------------------------------------------

    def append_log(
        self,
        migration_id: str,
        kind: str,
        message: str,
        *,
        from_state: MigrationState | None = None,
        to_state: MigrationState | None = None,
        droplet_id: str | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> None:
        """Append one line to a migration's history (never updated, never deleted)."""
        if droplet_id is None:
            droplet_id = self.get_migration(migration_id).droplet_id
        self.conn.execute(
            t.migration_log.insert().values(
                migration_id=migration_id,
                droplet_id=droplet_id,
                at=self.now,
                kind=kind,
                from_state=from_state.value if from_state else None,
                to_state=to_state.value if to_state else None,
                message=message,
                data=dict(data or {}),
            )
        )

    def migration_log(self, migration_id: str) -> list[LogEntry]:
        q = sa.select(t.migration_log).where(t.migration_log.c.migration_id == migration_id)
        return [_log_entry(r) for r in self.conn.execute(q.order_by(t.migration_log.c.id)).mappings()]

    def history(self, droplet_id: str) -> list[LogEntry]:
        """Every log line of every migration of a droplet, oldest first."""
        q = sa.select(t.migration_log).where(t.migration_log.c.droplet_id == droplet_id)
        return [_log_entry(r) for r in self.conn.execute(q.order_by(t.migration_log.c.id)).mappings()]

    # ---- the sim driver's shared world -------------------------------------------------------------------

    def sim_get(self, key: str, *, for_update: bool = False) -> Any | None:
        """The JSON value stored under ``key`` in ``sim_world`` (None when absent)."""
        q = sa.select(t.sim_world.c.value).where(t.sim_world.c.key == key)
        if for_update:
            q = q.with_for_update()
        row = self.conn.execute(q).first()
        return None if row is None else row[0]

    def sim_put(self, key: str, value: Any) -> None:
        """Insert or replace the JSON value under ``key``."""
        sw = t.sim_world
        updated = self.conn.execute(
            sw.update()
            .where(sw.c.key == key)
            .values(value=value, version=sw.c.version + 1, updated_at=self.now)
        )
        if updated.rowcount == 0:
            self.conn.execute(sw.insert().values(key=key, value=value, version=1, updated_at=self.now))

    def sim_keys(self, prefix: str = "") -> list[str]:
        q = sa.select(t.sim_world.c.key).where(t.sim_world.c.key.startswith(prefix, autoescape=True))
        return [r[0] for r in self.conn.execute(q.order_by(t.sim_world.c.key))]

    def sim_delete(self, key: str) -> None:
        self.conn.execute(t.sim_world.delete().where(t.sim_world.c.key == key))


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


def _sqlite_file_missing(url: str) -> bool:
    """Whether ``url`` names a SQLite file that does not exist (opening it would create it)."""
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError:
        return False  # create_db_engine says what is wrong with it
    if parsed.get_backend_name() != "sqlite":
        return False
    return not parsed.database or parsed.database == ":memory:" or not Path(parsed.database).exists()


class Store:
    """A handle on the database. Cheap methods here each run in their own transaction; compose several
    changes with ``with store.begin() as tx:``."""

    def __init__(self, engine: sa.Engine, *, clock: Clock = utc_now) -> None:
        self.engine = engine
        self.clock = clock
        #: Whether :meth:`open` created the store (there was no schema before).
        self.created = False

    @classmethod
    def open(cls, target: str | os.PathLike[str], *, clock: Clock = utc_now, create: bool = True) -> Store:
        """Open a database by path or URL, upgrading an older schema.

        ``create=True`` creates the store (the SQLite file and its directory, or the tables in an empty
        PostgreSQL database) when there is none, and sets :attr:`created`. ``create=False`` (what read-only
        callers use) never does: no file, or a database without the store's tables, raises
        :class:`StoreMissing` and leaves nothing behind."""
        url = database_url(target)
        if not create and _sqlite_file_missing(url):
            raise StoreMissing(store_location(url))
        engine = create_db_engine(url)
        try:
            existed = sa.inspect(engine).has_table(t.schema_version.name)
            if not existed and not create:
                engine.dispose()
                raise StoreMissing(store_location(url))
            ensure_schema(engine, clock=clock)
        except sa.exc.SQLAlchemyError as e:
            engine.dispose()
            raise StoreError(f"cannot open store {redact_url(url)}: {_first_line(e)}") from e
        store = cls(engine, clock=clock)
        store.created = not existed
        if store.created:
            log.info("created a new store at %s", store_location(url))
        return store

    @property
    def url(self) -> str:
        return redact_url(self.engine.url.render_as_string(hide_password=False))

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def begin(self, *, readonly: bool = False) -> Iterator[Tx]:
        """One transaction: commits when the block ends, rolls back if it raises."""
        try:
            with self.engine.connect() as raw_conn:
                conn = raw_conn.execution_options(readonly=True) if readonly else raw_conn
                with conn.begin():
                    clock = self._tx_clock(conn)
                    yield Tx(conn, clock, db_clock=clock is not self.clock)
        except HostEngineError:
            raise
        except sa.exc.IntegrityError as e:
            raise Conflict(f"store refused the change: {_first_line(e)}") from e
        except sa.exc.SQLAlchemyError as e:
            raise StoreError(f"store error: {_first_line(e)}") from e

    def _tx_clock(self, conn: sa.Connection) -> Callable[[], datetime]:
        """Where a transaction's ``now`` comes from: the database's clock on PostgreSQL (unless a clock was
        injected), else the store's."""
        if self.clock is not utc_now or conn.dialect.name != "postgresql":
            return self.clock

        def db_now() -> datetime:
            # The time of the statement that first needs it (not of the transaction's start): a claim reads
            # it after taking the claim lock, so the log orders claims as they happened.
            value: datetime = conn.execute(sa.text("SELECT statement_timestamp()")).scalar_one()
            return value.astimezone(UTC)

        return db_now

    def now(self) -> datetime:
        """The store's time now: the database's clock on PostgreSQL (see :class:`Tx`)."""
        with self.begin(readonly=True) as tx:
            return tx.now

    def schema_version(self) -> int:
        with self.begin(readonly=True) as tx:
            return int(tx.conn.execute(sa.select(sa.func.max(t.schema_version.c.version))).scalar() or 0)

    # Convenience wrappers, one transaction each.
    def add_host(self, host: Host) -> Host:
        with self.begin() as tx:
            return tx.add_host(host)

    def get_host(self, name: str) -> Host:
        with self.begin(readonly=True) as tx:
            return tx.get_host(name)

    def list_hosts(self, *, datacenter: str | None = None) -> list[Host]:
        with self.begin(readonly=True) as tx:
            return tx.list_hosts(datacenter=datacenter)

    def set_host_state(self, name: str, state: Any, *, reason: str = "", by: str = "") -> Host:
        with self.begin() as tx:
            return tx.set_host_state(name, state, reason=reason, by=by)

    def add_droplet(self, droplet: Droplet) -> Droplet:
        with self.begin() as tx:
            return tx.add_droplet(droplet)

    def get_droplet(self, droplet_id: str) -> Droplet:
        with self.begin(readonly=True) as tx:
            return tx.get_droplet(droplet_id)

    def list_droplets(self, *, host: str | None = None) -> list[Droplet]:
        with self.begin(readonly=True) as tx:
            return tx.list_droplets(host=host)

    def create_migrations(self, news: Sequence[NewMigration]) -> list[Migration]:
        with self.begin() as tx:
            return [tx.create_migration(n) for n in news]

    def get_migration(self, migration_id: str) -> Migration:
        with self.begin(readonly=True) as tx:
            return tx.get_migration(migration_id)

    def list_migrations(self, **filters: Any) -> list[Migration]:
        with self.begin(readonly=True) as tx:
            return tx.list_migrations(**filters)

    def transition(self, migration_id: str, to_state: MigrationState, **kwargs: Any) -> Migration:
        with self.begin() as tx:
            return tx.transition(migration_id, to_state, **kwargs)

    def update_migration(self, migration_id: str, **kwargs: Any) -> Migration:
        with self.begin() as tx:
            return tx.update_migration(migration_id, **kwargs)

    def claim(self, worker: str, **kwargs: Any) -> list[Migration]:
        with self.begin() as tx:
            return tx.claim(worker, **kwargs)

    def complete(self, migration_id: str, **kwargs: Any) -> Migration:
        with self.begin() as tx:
            return tx.complete(migration_id, **kwargs)

    def append_log(self, migration_id: str, kind: str, message: str, **kwargs: Any) -> None:
        with self.begin() as tx:
            tx.append_log(migration_id, kind, message, **kwargs)

    def history(self, droplet_id: str) -> list[LogEntry]:
        with self.begin(readonly=True) as tx:
            return tx.history(droplet_id)

    def migration_log(self, migration_id: str) -> list[LogEntry]:
        with self.begin(readonly=True) as tx:
            return tx.migration_log(migration_id)


def _first_line(e: BaseException) -> str:
    text = str(getattr(e, "orig", None) or e)
    return text.strip().splitlines()[0] if text.strip() else type(e).__name__
