"""Keeping every metadata server in line with the engine's view.

The store is the truth. :class:`MetadataSync` pushes it to the metadata servers through their admin API:

* ``notify(m)`` — at notice time: register the droplet if the server does not know it, then set
  ``live_migrate`` (``scheduled``) with the migration's event id, ``not_before`` and ``deadline``;
* ``clear(m)`` — after a cancel: clear the droplet's event, but only if it is still this migration's event
  (a newer migration of the same droplet may own it by now);
* ``reconcile_all()`` — on engine start-up and every minute after: for every server, list what it holds
  (``GET /admin/v1/droplets``), then register missing droplets, set missing or stale events, clear events
  the engine no longer wants, and remove droplets that the engine knows live on a host served by another
  server. Droplets the engine has never heard of are left alone and reported.

Each server is reached through the URL and token file of a host that names it; hosts naming the same URL
share one client. All calls are idempotent, so running any of this twice changes nothing the second time.
Its methods ``completed``, ``retry_scheduled``, ``offline_required`` and ``cancelled`` make it usable as the
executor's hooks (``host_engine.executor.ExecutorHooks``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from host_engine.errors import HostEngineError, NotFound, NotifierError, TransientError
from host_engine.expectation import predicted
from host_engine.metadata.client import AdminClient, RequestObserver, check_ca_file, read_token_file
from host_engine.models import Droplet, Host, Migration
from host_engine.states import ACTIVE_STATES, GuestEvent, MigrationState, guest_event
from host_engine.store import Store
from host_engine.timeparse import format_time

log = logging.getLogger(__name__)

ClientFactory = Callable[[Host], AdminClient]


def default_client_factory(
    *,
    timeout_s: float = 5.0,
    attempts: int = 4,
    sleep: Callable[[float], None] | None = None,
    ca_file: str = "",
) -> ClientFactory:
    """Clients for the hosts' metadata servers. ``ca_file`` (``[metadata] ca_file``) is checked here, once,
    so that a missing or unreadable bundle stops the engine at start-up (``ConfigError``)."""
    if ca_file:
        check_ca_file(ca_file)

    def make(host: Host) -> AdminClient:
        if not host.metadata_url:
            raise NotifierError(f"host {host.name} has no metadata server URL (host add --metadata-url)")
        token = read_token_file(host.metadata_token_file) if host.metadata_token_file else ""
        return AdminClient(
            host.metadata_url,
            token,
            timeout_s=timeout_s,
            attempts=attempts,
            sleep=sleep,
            ca_file=ca_file or None,
        )

    return make


@dataclass(frozen=True)
class DesiredEvent:
    id: str
    event: str
    state: str
    not_before: datetime | None
    deadline: datetime | None
    expected: dict[str, float] = field(default_factory=dict, compare=False)  # the prediction's PUT fields


def desired_event(m: Migration | None) -> DesiredEvent | None:
    """The event the guest must see for its active migration ``m`` (None: no event)."""
    if m is None:
        return None
    kind, state = guest_event(m.state)
    if kind is GuestEvent.NONE or state is None:
        return None
    p = predicted(m.stats)
    expected = p.for_guest() if p is not None else {}
    return DesiredEvent(m.event_id, kind.value, state, m.not_before, m.deadline, expected)


def _same_time(a: object, b: datetime | None) -> bool:
    if b is None:
        return a is None
    return isinstance(a, str) and a == format_time(b)


def _event_matches(actual: object, want: DesiredEvent) -> bool:
    if not isinstance(actual, dict):
        return False
    return (
        actual.get("id") == want.id
        and actual.get("event") == want.event
        and actual.get("state") == want.state
        and _same_time(actual.get("not_before"), want.not_before)
        and _same_time(actual.get("deadline"), want.deadline)
        # A server that shows no such field (an older one) cannot show the prediction: not a mismatch.
        and all(k not in actual or actual[k] == v for k, v in want.expected.items())
    )


def _registration_matches(doc: dict[str, Any] | None, d: Droplet) -> bool:
    return (
        doc is not None
        and sorted(doc.get("addresses") or []) == sorted(d.addresses)
        and (doc.get("hostname") or "") == (d.hostname or d.id)
    )


def _event_right(doc: dict[str, Any] | None, active: Migration | None) -> bool:
    """Whether the server shows the event the store wants for the droplet (or none when it wants none)."""
    want = desired_event(active)
    shown = (doc or {}).get("event") or {}
    if want is None:
        return not (isinstance(shown, dict) and shown.get("id"))
    return _event_matches(shown, want)


@dataclass
class ReconcileReport:
    server: str
    registered: list[str] = field(default_factory=list)
    events_set: list[str] = field(default_factory=list)
    events_cleared: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    error: str | None = None

    failed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.registered or self.events_set or self.events_cleared or self.removed)


class MetadataSync:
    """Pushes the engine's view to metadata servers. One instance per engine process (it caches clients)."""

    def __init__(
        self,
        store: Store,
        client_factory: ClientFactory | None = None,
        *,
        observer: RequestObserver | None = None,
    ) -> None:
        """``observer``: told the outcome of every request its clients make (the engine's ``up`` gauges)."""
        self.store = store
        self._factory = client_factory or default_client_factory()
        self._clients: dict[tuple[str, str], AdminClient] = {}
        self.observer = observer

    def close(self) -> None:
        for c in self._clients.values():
            c.close()
        self._clients.clear()

    def __enter__(self) -> MetadataSync:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def client(self, host: Host) -> AdminClient:
        key = (host.metadata_url.rstrip("/"), host.metadata_token_file)
        if key not in self._clients:
            self._clients[key] = self._factory(host)
            if self.observer is not None:
                self._clients[key].observer = self.observer
        return self._clients[key]

    # ---- one droplet -------------------------------------------------------------------------------------

    @staticmethod
    def register(client: AdminClient, droplet: Droplet, host: Host) -> dict[str, Any]:
        return client.put_droplet(
            droplet.id,
            list(droplet.addresses),
            hostname=droplet.hostname or droplet.id,
            region=host.datacenter,
        )

    def push(self, m: Migration, droplet: Droplet, host: Host, *, register_first: bool = False) -> bool:
        """Make ``host``'s server show ``m``'s event for ``droplet``, registering the droplet if the server
        does not know it (``register_first``: without asking first, when that is likely: a fresh server).
        True if the droplet had to be registered."""
        want = desired_event(m)
        client = self.client(host)
        if want is None:
            client.clear_event(droplet.id)
            return False
        registered = False
        if register_first:
            self.register(client, droplet, host)
            registered = True
        try:
            client.set_event(
                droplet.id,
                want.id,
                want.event,
                want.state,
                not_before=want.not_before,
                deadline=want.deadline,
                expected=want.expected,
            )
        except NotifierError as e:
            if e.status != 404:
                raise
            self.register(client, droplet, host)
            registered = True
            client.set_event(
                droplet.id,
                want.id,
                want.event,
                want.state,
                not_before=want.not_before,
                deadline=want.deadline,
                expected=want.expected,
            )
        return registered

    def notify(self, m: Migration) -> None:
        """Tell the droplet of ``m`` (in a state the guest sees) through its current host's server."""
        droplet = self.store.get_droplet(m.droplet_id)
        host = self.store.get_host(droplet.host)
        self.push(m, droplet, host)
        log.info(
            "migration_id=%s droplet_id=%s event_id=%s notice sent to %s (not_before %s)",
            m.id,
            m.droplet_id,
            m.event_id,
            host.metadata_url,
            format_time(m.not_before),
        )

    def clear(self, m: Migration) -> bool:
        """Clear ``m``'s event if the droplet's server still shows it; record that. True when done."""
        droplet = self.store.get_droplet(m.droplet_id)
        host = self.store.get_host(droplet.host)
        client = self.client(host)
        doc = client.get_droplet(droplet.id)
        shown = (doc or {}).get("event") or {}
        if isinstance(shown, dict) and shown.get("id") == m.event_id:
            client.clear_event(droplet.id)
            log.info("migration_id=%s droplet_id=%s event_id=%s cleared", m.id, m.droplet_id, m.event_id)
        self.store.update_migration(m.id, event_cleared_at=self.store.clock(), message="event cleared")
        return True

    # ---- executor hooks (host_engine.executor.ExecutorHooks) ---------------------------------------------

    def completed(self, migration: Migration) -> None:
        """After the switch: registered on the target's server, removed from the source's, no event left
        (two admin requests; one when both hosts share a server)."""
        droplet = self.store.get_droplet(migration.droplet_id)
        target = self.store.get_host(migration.target_host)
        source = self.store.get_host(migration.source_host)
        target_client = self.client(target)
        same_server = source.metadata_url.rstrip("/") == target.metadata_url.rstrip("/")
        if same_server and source.datacenter == target.datacenter:
            # Hosts sharing one server (small sites, the demo): the record is already right there (same
            # addresses, hostname and region), so the move only clears the flag. One request.
            target_client.clear_event(droplet.id)
        else:
            doc = self.register(target_client, droplet, target)
            if doc.get("event"):  # a stale event there (e.g. from an earlier stay): not this guest's any more
                target_client.clear_event(droplet.id)
            if not same_server:
                self.client(source).delete_droplet(droplet.id)  # its record goes, and the event with it
        self.store.update_migration(
            migration.id, event_cleared_at=self.store.clock(), message="event cleared"
        )

    def retry_scheduled(self, migration: Migration) -> None:
        self.notify(migration)

    def offline_required(self, migration: Migration) -> None:
        self.notify(migration)

    def cancelled(self, migration: Migration) -> None:
        self.clear(migration)

    # ---- start-up reconciliation -------------------------------------------------------------------------

    def _reconcile_droplet(
        self,
        client: AdminClient,
        url: str,
        d: Droplet,
        host: Host,
        doc: dict[str, Any] | None,
        active: Migration | None,
        report: ReconcileReport,
    ) -> None:
        if _registration_matches(doc, d) and _event_right(doc, active):
            return  # the usual case: nothing to do, nothing re-read
        # Something to change: decide on the store's word now, not on the pass's snapshot (other workers send
        # notices and complete migrations meanwhile; a stale decision would clear a guest's fresh event).
        fresh, current, where = self._current(d.id, url)
        if fresh is None or where is None:
            return  # gone, or moved to a host another server serves: that server's pass sees to it
        d, active, host = fresh, current, where
        if active is not None and active.state is MigrationState.PLANNED and active.claimed_by:
            return  # a worker is sending this droplet's notice right now: its event is that worker's
        if not _registration_matches(doc, d):
            if not d.addresses:
                report.failed.append((d.id, "no addresses: cannot register it (droplet set --address)"))
                return
            doc = self.register(client, d, host)
            report.registered.append(d.id)
        want = desired_event(active)
        shown = (doc or {}).get("event") or {}
        shown_id = shown.get("id") if isinstance(shown, dict) else None
        if want is not None and not _event_matches(shown, want):
            client.set_event(
                d.id,
                want.id,
                want.event,
                want.state,
                not_before=want.not_before,
                deadline=want.deadline,
                expected=want.expected,
            )
            report.events_set.append(d.id)
        elif want is None and shown_id:
            client.clear_event(d.id)
            report.events_cleared.append(d.id)

    def _current(self, droplet_id: str, url: str) -> tuple[Droplet | None, Migration | None, Host | None]:
        """The store's word on one droplet now: the droplet (None if gone), its active migration, and its
        host if the server at ``url`` serves it (else None)."""
        with self.store.begin(readonly=True) as tx:
            try:
                d = tx.get_droplet(droplet_id)
            except NotFound:
                return None, None, None
            host = tx.get_host(d.host)
            here = host.metadata_url.rstrip("/") == url
            return d, tx.active_migration_for(droplet_id), host if here else None

    def reconcile_all(self) -> list[ReconcileReport]:
        """Converge every metadata server named by a host. A server that cannot be reached is reported."""
        hosts = self.store.list_hosts()
        droplets = self.store.list_droplets()
        active = {m.droplet_id: m for m in self.store.list_migrations(states=ACTIVE_STATES)}
        by_server: dict[str, list[Host]] = {}
        for h in hosts:
            if h.metadata_url:
                by_server.setdefault(h.metadata_url.rstrip("/"), []).append(h)
        host_by_name = {h.name: h for h in hosts}
        # One pass over the droplets (not one per server): each droplet under the server of its host.
        server_of = {h.name: h.metadata_url.rstrip("/") for h in hosts}
        by_url: dict[str, list[Droplet]] = {}
        for d in droplets:
            by_url.setdefault(server_of.get(d.host, ""), []).append(d)
        all_ids = {d.id for d in droplets}
        reports = []
        for url, server_hosts in sorted(by_server.items()):
            mine = by_url.get(url, [])
            elsewhere = _Elsewhere(all_ids, {d.id for d in mine})
            try:
                reports.append(
                    self._reconcile_server(url, server_hosts[0], mine, elsewhere, active, host_by_name)
                )
            except HostEngineError as e:
                log.warning("reconcile %s failed: %s", url, e)
                reports.append(ReconcileReport(url, error=str(e)))
        return reports

    def _reconcile_server(
        self,
        url: str,
        via: Host,
        mine: Iterable[Droplet],
        elsewhere: Container[str],
        active: dict[str, Migration],
        hosts: dict[str, Host],
    ) -> ReconcileReport:
        client = self.client(via)
        report = ReconcileReport(url)
        actual = {str(d.get("id")): d for d in client.list_droplets()}
        wanted_ids = {d.id for d in mine}
        # Stale copies first: a droplet that moved away may hold an address a registration below needs.
        for did in sorted(set(actual) - wanted_ids):
            if did not in elsewhere:
                report.unknown.append(did)
                continue
            fresh, _, here = self._current(did, url)
            if fresh is not None and here is None:  # still elsewhere (not just moved here: then it stays)
                client.delete_droplet(did)
                report.removed.append(did)
        for d in mine:
            try:
                self._reconcile_droplet(
                    client, url, d, hosts[d.host], actual.get(d.id), active.get(d.id), report
                )
            except TransientError:
                raise  # the server is gone: the whole pass is retried
            except NotifierError as e:  # this droplet only (e.g. an address another droplet holds there)
                log.warning("reconcile %s: droplet_id=%s refused: %s", url, d.id, e)
                report.failed.append((d.id, str(e)))
        log.info(
            "reconciled %s: %d registered, %d events set, %d cleared, %d removed, %d unknown left alone",
            url,
            len(report.registered),
            len(report.events_set),
            len(report.events_cleared),
            len(report.removed),
            len(report.unknown),
        )
        return report


@dataclass(frozen=True)
class _Elsewhere:
    """Droplets the engine knows that live on a host served by another server (a set, without building one
    per server: membership is "known and not mine")."""

    known: set[str]
    mine: set[str]

    def __contains__(self, droplet_id: object) -> bool:
        return droplet_id in self.known and droplet_id not in self.mine


def pending_clears(store: Store) -> list[Migration]:
    """Cancelled migrations whose guest was told and whose event is not yet known to be cleared."""
    return [
        m
        for m in store.list_migrations(states=[MigrationState.CANCELLED], pending_event_clear=True)
        if m.notified_at is not None
    ]
