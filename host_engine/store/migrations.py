"""The migrations aggregate: creating migrations, reading them, and every state change (a transition,
checked against the one table in :mod:`host_engine.states` and logged in the same write)."""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from host_engine import schema as t
from host_engine.errors import Conflict, NotFound, StaleClaim
from host_engine.models import Migration, NewMigration
from host_engine.states import LogKind, MigrationState, check_transition
from host_engine.store.base import ACTIVE_VALUES
from host_engine.store.droplets import DropletsTx
from host_engine.store.log import LogTx

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


def new_migration_id() -> str:
    return "m-" + secrets.token_hex(5)


def live_event_id(migration_id: str) -> str:
    """The event id the guest sees for the live migration (kept across retries)."""
    return f"{migration_id}-live"


def offline_event_id(migration_id: str) -> str:
    """A NEW event id for the offline path."""
    return f"{migration_id}-offline"


def migration_from_row(row: sa.RowMapping) -> Migration:
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


class MigrationsTx(DropletsTx, LogTx):
    """Migrations: create, read, transition, update, and complete (the droplet changes host with it)."""

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
            LogKind.TRANSITION,
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
        return migration_from_row(row)

    def active_migration_for(self, droplet_id: str) -> Migration | None:
        q = sa.select(t.migrations).where(
            t.migrations.c.droplet_id == droplet_id, t.migrations.c.state.in_(ACTIVE_VALUES)
        )
        row = self.conn.execute(q).mappings().first()
        return migration_from_row(row) if row is not None else None

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
        return [migration_from_row(r) for r in self.conn.execute(q).mappings()]

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
            LogKind.TRANSITION,
            message or f"{current.value} -> {to_state.value}",
            from_state=current,
            to_state=to_state,
            droplet_id=row["droplet_id"],
            data=data,
        )
        return self.get_migration(migration_id)

    def update_migration(
        self, migration_id: str, *, message: str = "", log_kind: LogKind = LogKind.UPDATE, **changes: Any
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
