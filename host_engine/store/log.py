"""A migration's history, ``migration_log``: appended to, never updated, never deleted."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa

from host_engine import schema as t
from host_engine.errors import NotFound
from host_engine.models import LogEntry
from host_engine.states import LogKind, MigrationState
from host_engine.store.base import TxBase


def _kind(value: str) -> LogKind | str:
    try:
        return LogKind(value)
    except ValueError:  # written by a newer engine: shown as it is
        return value


def _log_entry(row: sa.RowMapping) -> LogEntry:
    return LogEntry(
        id=row["id"],
        migration_id=row["migration_id"],
        droplet_id=row["droplet_id"],
        at=row["at"],
        kind=_kind(row["kind"]),
        from_state=MigrationState(row["from_state"]) if row["from_state"] else None,
        to_state=MigrationState(row["to_state"]) if row["to_state"] else None,
        message=row["message"],
        data=dict(row["data"] or {}),
    )


class LogTx(TxBase):
    """Append to and read ``migration_log``."""

    def append_log(
        self,
        migration_id: str,
        kind: LogKind,
        message: str,
        *,
        from_state: MigrationState | None = None,
        to_state: MigrationState | None = None,
        droplet_id: str | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> None:
        """Append one line to a migration's history (never updated, never deleted)."""
        if droplet_id is None:
            m = t.migrations
            droplet_id = self.conn.execute(
                sa.select(m.c.droplet_id).where(m.c.id == migration_id)
            ).scalar_one_or_none()
            if droplet_id is None:
                raise NotFound(f"unknown migration {migration_id!r}")
        self.conn.execute(
            t.migration_log.insert().values(
                migration_id=migration_id,
                droplet_id=droplet_id,
                at=self.now,
                kind=LogKind(kind).value,  # a bare string is checked, not stored blindly
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
