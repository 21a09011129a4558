"""The guests' acknowledgements, read from their metadata servers into the store (DESIGN.md §3 step 4).

A guest answers its event on the metadata server (``POST /v1/maintenance_event/ack``): ``ready`` (the
executor may start before ``not_before``) or ``offline`` (it powers itself off; the executor then copies it
offline and leaves it powered as the guest asked: ``power_on_after``). The executor only looks at
``migrations.ack`` and ``migrations.power_on_after``, so each engine tick :class:`AckReader` reads the
droplet record (``GET /admin/v1/droplets/<id>``, which carries the ack of the current event only) of every
migration whose guest has an outstanding event (``notified``, ``offline_required``) and records an ack that
is new or changed, with a line in the migration's history, in one transaction.

The store keeps the ack once seen: a server that lost its state (and with it the ack) does not erase it.
At most one request per droplet per tick; a server that cannot be reached is logged once (until it answers
again) and skipped for the rest of the tick, and the other servers are still read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from host_engine.errors import HostEngineError
from host_engine.models import Droplet, Host, Migration
from host_engine.reconcile import MetadataSync
from host_engine.states import MigrationState
from host_engine.store import Store

log = logging.getLogger(__name__)

#: States in which the guest sees an event it may acknowledge and the executor has not started yet.
ACK_STATES = (MigrationState.NOTIFIED, MigrationState.OFFLINE_REQUIRED)
ACTIONS = ("ready", "offline")


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

    def __init__(self, store: Store, sync: MetadataSync) -> None:
        self.store = store
        self.sync = sync
        self._down: set[str] = set()  # servers whose failure was logged, until they answer again

    def _pending(self) -> list[tuple[Migration, Droplet, Host]]:
        with self.store.begin(readonly=True) as tx:
            hosts = {h.name: h for h in tx.list_hosts()}
            out = []
            for m in tx.list_migrations(states=ACK_STATES):
                if m.notified_at is None:
                    continue  # the guest was never told
                droplet = tx.get_droplet(m.droplet_id)
                out.append((m, droplet, hosts[droplet.host]))
            return out

    def read(self) -> tuple[list[Migration], list[str]]:
        """Record new acks. Returns the migrations whose ack changed, and one error per unreachable server."""
        recorded: list[Migration] = []
        errors: list[str] = []
        failed: set[str] = set()
        for m, droplet, host in self._pending():
            server = host.metadata_url.rstrip("/") or host.name
            if server in failed:
                continue
            try:
                doc = self.sync.client(host).get_droplet(droplet.id)
            except HostEngineError as e:
                failed.add(server)
                errors.append(f"reading acks from {server}: {e}")
                if server not in self._down:
                    self._down.add(server)
                    log.warning("reading guest acks from %s failed (retried every tick): %s", server, e)
                continue
            if server in self._down:
                self._down.discard(server)
                log.info("reading guest acks from %s works again", server)
            ack = ack_of(doc, m.event_id)
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
                log_kind="ack",
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
