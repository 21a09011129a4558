"""The hosts aggregate: hypervisors, their capacity and their operator-set state."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from host_engine import schema as t
from host_engine.errors import Conflict, NotFound
from host_engine.models import Host
from host_engine.states import HostState
from host_engine.store.base import TxBase


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


class HostsTx(TxBase):
    """Hosts: add, read, change (state changes carry who and why)."""

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
