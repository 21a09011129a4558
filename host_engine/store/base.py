"""What every part of a transaction shares: its connection, its one ``now``, and the planner's lock."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

import sqlalchemy as sa

from host_engine.states import ACTIVE_STATES
from host_engine.timeparse import utc_now

#: Migration states (as stored) that hold a droplet: planned through running, not yet finished.
ACTIVE_VALUES = tuple(s.value for s in ACTIVE_STATES)


class TxBase:
    """One open transaction's connection and time, shared by every aggregate's operations.

    ``now`` is read once per transaction (on first use), so every row it writes carries the same time. On
    PostgreSQL with the default clock it is the database's ``now()``: claims, leases and due times compare
    times from ONE clock however many machines run workers. An injected clock (tests) or
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
