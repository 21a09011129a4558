"""Which worker does the fleet-wide chores: reconciling the metadata servers, reading the guests' acks and
clearing cancelled events. One worker at a time, however many run on one store.

On PostgreSQL the elected worker holds a session-level advisory lock (:data:`LEADER_LOCK_KEY`) on a
connection of its own, kept open (idle, in autocommit) for as long as it leads. Nothing has to expire: when
its process dies or loses the database, its session ends, PostgreSQL drops the lock, and the next worker that
asks gets it (each tick every worker asks, with ``pg_try_advisory_lock``, which never waits). The leader
checks its connection each tick; a broken one means leadership is lost until it is won again.

SQLite serves one process (the database file is local): that process always leads.
"""

from __future__ import annotations

import logging

import sqlalchemy as sa

from host_engine.store import Store

log = logging.getLogger(__name__)

#: The advisory lock of the fleet's chores. Other keys in use: 7412001 schema changes, 7412002 planners,
#: 7412003 claims (host_engine/store.py).
LEADER_LOCK_KEY = 7412100


class FleetLeader:
    """This process's claim to the fleet's chores. :meth:`check` once per tick; :meth:`release` at the end."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._conn: sa.Connection | None = None
        self._postgres = store.engine.dialect.name == "postgresql"

    @property
    def held(self) -> bool:
        return not self._postgres or self._conn is not None

    def check(self) -> bool:
        """True if this process leads now: it already did and its session is alive, or it just won."""
        if not self._postgres:
            return True
        if self._conn is not None:
            try:
                self._conn.execute(sa.text("SELECT 1"))
                return True
            except sa.exc.SQLAlchemyError as e:
                log.warning("lost the fleet's chores (its database session broke): %s", _line(e))
                self._drop()
        return self._try_acquire()

    def _try_acquire(self) -> bool:
        conn: sa.Connection | None = None
        try:
            conn = self.store.engine.connect()
            conn.execution_options(isolation_level="AUTOCOMMIT")
            won = bool(
                conn.execute(sa.text("SELECT pg_try_advisory_lock(:key)"), {"key": LEADER_LOCK_KEY}).scalar()
            )
        except sa.exc.SQLAlchemyError as e:
            log.debug("asking for the fleet's chores failed: %s", _line(e))
            if conn is not None:
                conn.invalidate()
                conn.close()
            return False
        if not won:
            conn.close()  # held by no lock of ours: back to the pool
            return False
        self._conn = conn
        log.info("this worker now reconciles the metadata servers and reads the guests' acks for the fleet")
        return True

    def release(self) -> None:
        """Step down (another worker takes over at its next tick). Safe to call when not leading."""
        if self._conn is None:
            return
        try:
            self._conn.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": LEADER_LOCK_KEY})
            self._conn.close()
        except sa.exc.SQLAlchemyError:
            self._drop()
        self._conn = None
        log.info("stepped down from the fleet's chores")

    def _drop(self) -> None:
        """Forget a broken connection: closing the database session is what gives the lock up."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            conn.invalidate()
            conn.close()
        except sa.exc.SQLAlchemyError:
            pass


def _line(e: BaseException) -> str:
    text = str(getattr(e, "orig", None) or e).strip()
    return text.splitlines()[0] if text else type(e).__name__
