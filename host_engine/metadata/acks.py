"""The guests' acknowledgements, read from their metadata servers into the store.

A guest answers its event on the metadata server (``POST /v1/maintenance_event/ack``): ``ready`` (the
executor may start before ``not_before``) or ``offline`` (it powers itself off; the executor then copies it
offline and leaves it powered as the guest asked: ``power_on_after``). The executor only looks at
``migrations.ack`` and ``migrations.power_on_after``, so :class:`AckReader` (an engine step) finds the
migrations whose guest has an outstanding event (``notified``, ``offline_required``; one query), reads ONE
list from each metadata server serving at least one of them (``GET /admin/v1/droplets``: every droplet with
its current event and that event's ack), and records an ack that is new or changed, with a line in the
migration's history, in one transaction.

Only the worker elected for the fleet's chores reads acks (:mod:`host_engine.metadata.election`), at most once
per tick and per ``every`` (:data:`ACK_READ_EVERY`), so the load on a metadata server is one list every few
seconds while it has outstanding events, whatever the number of workers and droplets. An ack lets the
executor start early or go offline: a few seconds' delay costs nothing against a notice of minutes.

The store keeps the ack once seen: a server that lost its state (and with it the ack) does not erase it. A
server that cannot be reached is logged once (until it answers again), and the other servers are still read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from host_engine import schema as t
from host_engine.errors import HostEngineError
from host_engine.metadata.reconcile import MetadataSync
from host_engine.models import Host, Migration
from host_engine.states import LogKind, MigrationState
from host_engine.store import Store
from host_engine.timeparse import Clock

log = logging.getLogger(__name__)

#: States in which the guest sees an event it may acknowledge and the executor has not started yet.
ACK_STATES = (MigrationState.NOTIFIED, MigrationState.OFFLINE_REQUIRED)
ACTIONS = ("ready", "offline")
#: How often the acks are read (while any event is outstanding). ``timedelta(0)``: every tick.
ACK_READ_EVERY = timedelta(seconds=5)


@dataclass(frozen=True)
class GuestAck:
    action: str  # "ready" | "offline"
    power_on_after: bool


def ack_of(doc: dict[str, Any] | None, event_id: str) -> GuestAck | None:
    """The guest's ack in an admin droplet record, if it answers the event ``event_id`` (None otherwise)."""
    if not isinstance(doc, dict):
        return None
    event, ack = doc.get("event"), doc.get("ack")
    if not isinstance(event, dict) or event.get("id") != event_id or not isinstance(ack, dict):
        return None
    action = ack.get("action")
    if action not in ACTIONS:
        return None
    power_on_after = ack.get("power_on_after")
    return GuestAck(str(action), power_on_after if isinstance(power_on_after, bool) else True)


class AckReader:
    """Copies new acknowledgements from the metadata servers into ``migrations.ack`` (one engine step)."""

    def __init__(
        self,
        store: Store,
        sync: MetadataSync,
        *,
        every: timedelta = ACK_READ_EVERY,
        clock: Clock | None = None,
    ) -> None:
        self.store = store
        self.sync = sync
        self.every = every
        self.clock = clock or store.clock
        self._read_at: datetime | None = None  # when the servers were last read
        self._down: set[str] = set()  # servers whose failure was logged, until they answer again

    def _pending(self) -> dict[str, tuple[Host, list[tuple[Migration, str]]]]:
        """Migrations whose guest was told and may still answer, with droplet id, by metadata server."""
        with self.store.begin(readonly=True) as tx:
            waiting = [m for m in tx.list_migrations(states=ACK_STATES) if m.notified_at is not None]
            if not waiting:
                return {}
            d = t.droplets
            ids = sorted({m.droplet_id for m in waiting})
            rows = tx.conn.execute(sa.select(d.c.id, d.c.host).where(d.c.id.in_(ids))).all()
            host_of: dict[str, str] = {row.id: row.host for row in rows}
            hosts = {h.name: h for h in tx.list_hosts()}
        by_server: dict[str, tuple[Host, list[tuple[Migration, str]]]] = {}
        for m in waiting:
            host = hosts[host_of[m.droplet_id]]
            server = host.metadata_url.rstrip("/") or host.name
            by_server.setdefault(server, (host, []))[1].append((m, m.droplet_id))
        return by_server

    def read(self) -> tuple[list[Migration], list[str]]:
        """Record new acks, if they are due to be read. Returns the migrations whose ack changed, and one
        error per unreachable server."""
        recorded: list[Migration] = []
        errors: list[str] = []
        now = self.clock()
        if self._read_at is not None and now - self._read_at < self.every:
            return recorded, errors
        pending = self._pending()
        if pending:
            self._read_at = now
        for server, (host, waiting) in sorted(pending.items()):
            try:
                docs = {str(doc.get("id")): doc for doc in self.sync.client(host).list_droplets()}
            except HostEngineError as e:
                errors.append(f"reading acks from {server}: {e}")
                if server not in self._down:
                    self._down.add(server)
                    log.warning("reading guest acks from %s failed (retried every tick): %s", server, e)
                continue
            if server in self._down:
                self._down.discard(server)
                log.info("reading guest acks from %s works again", server)
            for m, droplet_id in waiting:
                ack = ack_of(docs.get(droplet_id), m.event_id)
                if ack is not None and (ack.action, ack.power_on_after) != (m.ack, m.power_on_after):
                    done = self._record(m, ack)
                    if done is not None:
                        recorded.append(done)
        return recorded, errors

    def _record(self, m: Migration, ack: GuestAck) -> Migration | None:
        """Write the ack if the migration still waits on this event (it may have started meanwhile)."""
        with self.store.begin() as tx:
            current = tx.get_migration(m.id, for_update=True)
            if current.state not in ACK_STATES or current.event_id != m.event_id:
                return None
            if (current.ack, current.power_on_after) == (ack.action, ack.power_on_after):
                return None
            power = "true" if ack.power_on_after else "false"
            done = tx.update_migration(
                m.id,
                ack=ack.action,
                power_on_after=ack.power_on_after,
                message=f"guest acknowledged {ack.action}, power_on_after={power}",
                log_kind=LogKind.ACK,
            )
        log.info(
            "migration_id=%s droplet_id=%s event_id=%s guest acknowledged %s (power_on_after=%s)",
            m.id,
            m.droplet_id,
            m.event_id,
            ack.action,
            power,
        )
        return done
