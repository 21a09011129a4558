"""The sim driver's shared world (``sim_world``): JSON values under keys, shared by every process."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

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
