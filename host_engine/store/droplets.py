"""The droplets aggregate: droplets, where they run, and what they commit on each host."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa

from host_engine import schema as t
from host_engine.errors import Conflict, NotFound
from host_engine.models import Droplet, Usage
from host_engine.states import PowerState
from host_engine.store.base import ACTIVE_VALUES
from host_engine.store.hosts import HostsTx


def power_state(value: str) -> PowerState | str:
    """The stored ``power_state`` as a :class:`PowerState`; a value this engine does not know (a newer engine
    wrote it) is kept as it is, so reading never fails and ``droplet list`` shows what is stored."""
    try:
        return PowerState(value)
    except ValueError:
        return value


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
        power_state=power_state(row["power_state"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


class DropletsTx(HostsTx):
    """Droplets (each on a host), and the resources and owner tags committed to each host."""

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
                power_state=_checked_power(droplet.power_state),
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
        if "power_state" in changes:
            changes["power_state"] = _checked_power(changes["power_state"])
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
            .where(m.c.state.in_(ACTIVE_VALUES))
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
            .where(m.c.state.in_(ACTIVE_VALUES), d.c.owner_tag != "")
            .distinct()
        )
        if wanted is not None:
            q2 = q2.where(d.c.owner_tag.in_(wanted))
        for host, tag in self.conn.execute(q2):
            tags.setdefault(host, set()).add(tag)
        return tags


def _checked_power(value: PowerState | str) -> str:
    """The value to store: a bare string is checked (ValueError naming it), not stored blindly."""
    return PowerState(value).value
