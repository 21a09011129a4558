"""Sending the notices that fall due: each exactly once across every worker, each giving the guest at
least its full notice from the moment it was actually told.

**Once.** A worker claims due ``planned`` migrations the way the executor claims work: ``SELECT ... FOR
UPDATE SKIP LOCKED`` (on SQLite every write transaction holds the database's write lock), writing
``claimed_by``/``claimed_at`` in that short transaction. Only the claim holder sends the notice; other
workers skip claimed rows until the claim's lease (:data:`NOTICE_LEASE_S`) expires, which only happens when
the holder died mid-notice (the next worker then sends it again: the ``PUT`` is idempotent). No row lock or
transaction is held open across the HTTP call.

**Full notice.** The promise is ``notice = not_before - notice_at`` (set by the planner). The guest can see
the event from some moment during the ``PUT``; the engine knows it was told by the time the ``PUT``
answered. So the ``notified`` transition is written in a transaction that starts after the answer, with
``notified_at`` = that transaction's time (the database's clock on PostgreSQL) and ``not_before =
max(not_before, notified_at + notice)`` (whole seconds, as on the wire), ``deadline`` moved by as much.
The history line says when the guest was told, how much notice it got, and how far ``not_before`` moved.

So that delivering a notice (which takes a moment) does not move ``not_before`` every time, a notice is
claimed up to :func:`send_ahead` (one poll interval + :data:`DELIVERY_ALLOWANCE`) before its notice time:
the guest gets its notice plus at most that much. A notice claimed late (the engine was down, a server was
unreachable) goes out with ``not_before`` already moved to the send time + notice + the allowance; if it is
delivered later still (a slow server, retries), ``not_before`` moves again and a second ``PUT`` shows the
guest the later time (if that one fails, the reconciliation shows it; the store, which the executor
follows, is right either way). A guest that acknowledges ``ready`` may still be migrated earlier: its choice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

import sqlalchemy as sa

from host_engine import schema as t
from host_engine.errors import Conflict, HostEngineError, StaleClaim, TransientError
from host_engine.metadata.reconcile import MetadataSync
from host_engine.models import Droplet, Host, Migration
from host_engine.states import MigrationState
from host_engine.store import Store
from host_engine.timeparse import Clock, format_duration, format_time

log = logging.getLogger(__name__)

#: How long a notice claim holds before another worker may take it over (its holder presumably died). It
#: must outlast one batch's sending: each ``PUT`` is bounded by the admin client's timeout and retries.
NOTICE_LEASE_S = 120.0
#: Notices claimed per transaction: small, so workers share a wave of notices and a claim is sent soon.
NOTICE_BATCH = 25
#: At most this many batches per tick (a bounded loop); what is left is sent on the next tick.
MAX_BATCHES_PER_TICK = 40
#: Time a notice's ``PUT`` may take without moving ``not_before``.
DELIVERY_ALLOWANCE = timedelta(seconds=1)


def send_ahead(poll_interval_s: float) -> timedelta:
    """How long before its notice time a notice is claimed: a tick lands at most one poll interval before it,
    and the allowance lets the ``PUT`` finish before the notice time itself."""
    return timedelta(seconds=max(0.0, poll_interval_s)) + DELIVERY_ALLOWANCE


def promised_notice(m: Migration) -> timedelta:
    """The notice the guest was promised (the planner sets ``notice_at = not_before - notice``)."""
    return m.not_before - m.notice_at


def ceil_second(value: datetime) -> datetime:
    """``value`` rounded up to a whole second (times on the wire have whole seconds)."""
    whole = value.replace(microsecond=0)
    return whole if whole == value else whole + timedelta(seconds=1)


def window_for(m: Migration, told_by: datetime, *, allowance: timedelta = timedelta(0)) -> datetime:
    """The earliest ``not_before`` that keeps ``m``'s promised notice for a guest told by ``told_by`` (plus
    ``allowance`` for delivering it): ``m.not_before`` itself when that is already enough."""
    notice = promised_notice(m)
    if notice <= timedelta(0):
        return m.not_before  # nothing promised (``migrate --now --notice 0s``)
    return max(m.not_before, ceil_second(told_by + notice + allowance))


def moved(m: Migration, not_before: datetime) -> Migration:
    """``m`` with ``not_before`` moved to ``not_before``: ``deadline`` and ``notice_at`` move by as much, so
    the window's length and the promised notice stay what they were."""
    shift = not_before - m.not_before
    return replace(m, not_before=not_before, deadline=m.deadline + shift, notice_at=m.notice_at + shift)


@dataclass
class NoticeResult:
    sent: list[Migration] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class NoticeSender:
    """Claims the due notices for ``worker`` and sends them (one engine step, run by every worker)."""

    def __init__(
        self,
        store: Store,
        sync: MetadataSync,
        worker: str,
        *,
        poll_interval_s: float,
        clock: Clock | None = None,
        lease_s: float = NOTICE_LEASE_S,
        batch: int = NOTICE_BATCH,
    ) -> None:
        """``clock`` measures the time spent sending a batch (so each notice's window is computed from when it
        leaves, not from when the batch was claimed); the claim's own time is the store's."""
        self.store = store
        self.sync = sync
        self.worker = worker
        self.ahead = send_ahead(poll_interval_s)
        self.clock = clock or store.clock
        self.lease_s = lease_s
        self.batch = max(1, batch)

    # ---- the store's side --------------------------------------------------------------------------------

    def claim(self) -> tuple[list[tuple[Migration, Droplet, Host]], datetime]:
        """Claim up to one batch of due notices; return them (with droplet and host) and the claim's time."""
        m = t.migrations
        with self.store.begin() as tx:
            now = tx.now
            stale_before = now - timedelta(seconds=self.lease_s)
            q = (
                sa.select(m.c.id)
                .where(
                    m.c.state == MigrationState.PLANNED.value,
                    m.c.notice_at <= now + self.ahead,
                    sa.or_(m.c.claimed_by.is_(None), m.c.claimed_at < stale_before),
                )
                .order_by(m.c.notice_at, m.c.id)
                .limit(self.batch)
                .with_for_update(skip_locked=True)
            )
            ids = list(tx.conn.execute(q).scalars())
            if not ids:
                return [], now
            tx.conn.execute(
                m.update()
                .where(m.c.id.in_(ids))
                .values(claimed_by=self.worker, claimed_at=now, updated_at=now)
            )
            hosts = {h.name: h for h in tx.list_hosts()}
            out = []
            for mid in ids:
                mig = tx.get_migration(mid)
                droplet = tx.get_droplet(mig.droplet_id)
                out.append((mig, droplet, hosts[droplet.host]))
            return out, now

    def release(self, migration_id: str) -> None:
        """Give a claim back (the notice could not be sent): the next tick, on any worker, tries again."""
        m = t.migrations
        with self.store.begin() as tx:
            tx.conn.execute(
                m.update()
                .where(
                    m.c.id == migration_id,
                    m.c.state == MigrationState.PLANNED.value,
                    m.c.claimed_by == self.worker,
                )
                .values(claimed_by=None, claimed_at=None)
            )

    def record(self, sent: Migration, planned: Migration) -> Migration:
        """The ``notified`` transition, written after the ``PUT`` answered: ``notified_at`` is this
        transaction's time, and ``not_before`` keeps the full notice from it."""
        notice = promised_notice(planned)
        with self.store.begin() as tx:
            told = tx.now
            final = moved(sent, window_for(sent, told))
            lead = final.not_before - told
            shift = final.not_before - planned.not_before
            if shift > timedelta(0):
                note = (
                    f"notice sent by {self.worker}: guest told at {format_time(told)}, "
                    f"{format_duration(told - planned.notice_at)} after its notice time; not_before moved "
                    f"from {format_time(planned.not_before)} to {format_time(final.not_before)} "
                    f"so the guest gets its full {format_duration(notice)} notice"
                )
            else:
                note = (
                    f"notice sent by {self.worker}: guest told at {format_time(told)}, "
                    f"{format_duration(lead)} before {format_time(final.not_before)} "
                    f"({format_duration(notice)} promised)"
                )
            return tx.transition(
                planned.id,
                MigrationState.NOTIFIED,
                expect=MigrationState.PLANNED,
                worker=self.worker,
                message=note,
                data={
                    "worker": self.worker,
                    "told_at": format_time(told),
                    "notice_s": notice.total_seconds(),
                    "lead_s": lead.total_seconds(),
                    "moved_s": shift.total_seconds(),
                },
                notified_at=told,
                not_before=final.not_before,
                deadline=final.deadline,
                notice_at=final.notice_at,
                claimed_by=None,
                claimed_at=None,
            )

    # ---- one tick ----------------------------------------------------------------------------------------

    def send_due(self) -> NoticeResult:
        """Claim and send batches until nothing is due (at most :data:`MAX_BATCHES_PER_TICK` batches).

        A server that cannot be reached is tried once per tick: the claims of its other notices are given
        back at once, and the other servers' notices still go out."""
        result = NoticeResult()
        down: set[str] = set()
        # Droplets known to servers that did not know one this tick (a fresh server, before the
        # reconciliation got to it): one list tells which of the next notices must register first, instead
        # of a 404 each.
        known: dict[str, set[str]] = {}
        for _ in range(MAX_BATCHES_PER_TICK):
            batch, claimed_at = self.claim()
            if not batch:
                break
            started = self.clock()
            for planned, droplet, host in batch:
                server = host.metadata_url.rstrip("/") or host.name
                if server in down:
                    self.release(planned.id)
                    continue
                # Claimed at ``claimed_at`` (store time); this notice leaves ``elapsed`` later.
                elapsed = max(timedelta(0), self.clock() - started)
                when = claimed_at + elapsed
                sent = moved(planned, window_for(planned, when, allowance=DELIVERY_ALLOWANCE))
                sent = replace(sent, state=MigrationState.NOTIFIED)
                try:
                    register_first = server in known and droplet.id not in known[server]
                    registered = self.sync.push(sent, droplet, host, register_first=register_first)
                except HostEngineError as e:
                    log.warning(
                        "migration_id=%s droplet_id=%s notice failed: %s", planned.id, planned.droplet_id, e
                    )
                    result.errors.append(f"{planned.id}: {e}")
                    if isinstance(e, TransientError):
                        down.add(server)
                    self.release(planned.id)
                    continue
                if registered:
                    self._learn_known(known, server, host, droplet.id)
                done = self._recorded(sent, planned, droplet, host, result)
                if done is not None:
                    result.sent.append(done)
            if len(batch) < self.batch:
                break
        return result

    def _learn_known(self, known: dict[str, set[str]], server: str, host: Host, droplet_id: str) -> None:
        if server not in known:
            try:
                known[server] = {str(doc.get("id")) for doc in self.sync.client(host).list_droplets()}
            except HostEngineError as e:
                log.info("listing the droplets of %s failed (notices there ask first): %s", server, e)
                return
        known[server].add(droplet_id)

    def _recorded(
        self, sent: Migration, planned: Migration, droplet: Droplet, host: Host, result: NoticeResult
    ) -> Migration | None:
        try:
            done = self.record(sent, planned)
        except (Conflict, StaleClaim):
            self._changed_meanwhile(planned, droplet, host, result)
            return None
        log.info(
            "migration_id=%s droplet_id=%s event_id=%s notice sent to %s (not_before %s)",
            done.id,
            done.droplet_id,
            done.event_id,
            host.metadata_url,
            format_time(done.not_before),
        )
        if done.not_before > sent.not_before:
            # Delivered later than the window sent allows for: show the guest the later time it now has.
            try:
                self.sync.push(done, droplet, host)
            except HostEngineError as e:
                log.warning(
                    "migration_id=%s droplet_id=%s showing the moved not_before failed (the reconciliation "
                    "restores it): %s",
                    done.id,
                    done.droplet_id,
                    e,
                )
                result.errors.append(f"{done.id}: {e}")
        return done

    def _changed_meanwhile(
        self, planned: Migration, droplet: Droplet, host: Host, result: NoticeResult
    ) -> None:
        """The migration changed while its notice was out: cancelled (take the event back), or its claim
        expired and another worker recorded the notice (nothing to do)."""
        current = self.store.get_migration(planned.id)
        log.info(
            "migration_id=%s changed to %s during its notice (claim %s)",
            planned.id,
            current.state.value,
            current.claimed_by,
        )
        if current.state is not MigrationState.CANCELLED:
            return
        if current.notified_at is None:  # the guest was told: the event must be cleared
            with self.store.begin() as tx:
                current = tx.update_migration(planned.id, notified_at=tx.now)
        try:
            self.sync.clear(current)
        except HostEngineError as e:
            log.warning(
                "migration_id=%s droplet_id=%s clearing the event failed: %s", planned.id, droplet.id, e
            )
            result.errors.append(f"{planned.id}: {e}")


__all__ = ["NoticeResult", "NoticeSender", "ceil_second", "promised_notice", "send_ahead", "window_for"]
