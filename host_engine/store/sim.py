"""The sim driver's shared world (``sim_world``): JSON values under keys, shared by every process."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
import sqlalchemy.dialects.postgresql
import sqlalchemy.dialects.sqlite

from host_engine import schema as t
from host_engine.store.base import TxBase


class SimTx(TxBase):
    """Read and write ``sim_world``."""

    def sim_get(self, key: str, *, for_update: bool = False) -> Any | None:
        """The JSON value stored under ``key`` in ``sim_world`` (None when absent)."""
        q = sa.select(t.sim_world.c.value).where(t.sim_world.c.key == key)
        if for_update:
            q = q.with_for_update()
        row = self.conn.execute(q).first()
        return None if row is None else row[0]

    def sim_put(self, key: str, value: Any) -> None:
        """Insert or replace the JSON value under ``key``.

        One upsert statement: two processes writing a key neither has yet (two ``run --driver sim`` starting
        at once on PostgreSQL) cannot both insert it; the later one waits and replaces."""
        sw = t.sim_world
        insert = self._upsert_insert().values(key=key, value=value, version=1, updated_at=self.now)
        self.conn.execute(
            insert.on_conflict_do_update(
                index_elements=[sw.c.key],
                set_={"value": insert.excluded.value, "version": sw.c.version + 1, "updated_at": self.now},
            )
        )

    def sim_setdefault(self, key: str, value: Any) -> Any:
        """The value under ``key``; ``value``, stored, when there is none (the first writer's value wins)."""
        sw = t.sim_world
        self.conn.execute(
            self._upsert_insert()
            .values(key=key, value=value, version=1, updated_at=self.now)
            .on_conflict_do_nothing(index_elements=[sw.c.key])
        )
        return self.sim_get(key, for_update=True)

    def _upsert_insert(self) -> Any:
        """``INSERT`` with ``ON CONFLICT`` for this database (PostgreSQL and SQLite both have it)."""
        if self.conn.dialect.name == "postgresql":
            return sa.dialects.postgresql.insert(t.sim_world)
        return sa.dialects.sqlite.insert(t.sim_world)

    def sim_keys(self, prefix: str = "") -> list[str]:
        q = sa.select(t.sim_world.c.key).where(t.sim_world.c.key.startswith(prefix, autoescape=True))
        return [r[0] for r in self.conn.execute(q.order_by(t.sim_world.c.key))]

    def sim_delete(self, key: str) -> None:
        self.conn.execute(t.sim_world.delete().where(t.sim_world.c.key == key))
