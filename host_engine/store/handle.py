"""The store's two objects: :class:`Store` (a handle on the database) and :class:`Tx` (one transaction)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from host_engine import schema as t
from host_engine.errors import Conflict, HostEngineError, StoreError
from host_engine.models import Droplet, Host, LogEntry, Migration, NewMigration
from host_engine.states import LogKind, MigrationState
from host_engine.store.claims import ClaimsTx
from host_engine.store.database import (
    StoreMissing,
    create_db_engine,
    database_url,
    ensure_schema,
    first_line,
    redact_url,
    sqlite_file_missing,
    store_location,
)
from host_engine.store.sim import SimTx
from host_engine.timeparse import Clock, utc_now

log = logging.getLogger(__name__)


class Tx(ClaimsTx, SimTx):
    """The store's operations inside one open transaction. Get one from :meth:`Store.begin`.

    One object, composed from one class per aggregate (hosts, droplets, migrations, log, claims, sim; see
    the package's docstring); :class:`~host_engine.store.base.TxBase` holds what they share.
    """


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
        if not create and sqlite_file_missing(url):
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
            raise StoreError(f"cannot open store {redact_url(url)}: {first_line(e)}") from e
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
            raise Conflict(f"store refused the change: {first_line(e)}") from e
        except sa.exc.SQLAlchemyError as e:
            raise StoreError(f"store error: {first_line(e)}") from e

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

    def append_log(self, migration_id: str, kind: LogKind, message: str, **kwargs: Any) -> None:
        with self.begin() as tx:
            tx.append_log(migration_id, kind, message, **kwargs)

    def history(self, droplet_id: str) -> list[LogEntry]:
        with self.begin(readonly=True) as tx:
            return tx.history(droplet_id)

    def migration_log(self, migration_id: str) -> list[LogEntry]:
        with self.begin(readonly=True) as tx:
            return tx.migration_log(migration_id)
