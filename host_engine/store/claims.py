"""Who runs which migration: claims, their leases, and the fleet's concurrency limits."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa

from host_engine import schema as t
from host_engine.errors import NotFound, StaleClaim
from host_engine.models import Migration
from host_engine.states import Ack, LogKind, MigrationState
from host_engine.store.migrations import MigrationsTx, migration_from_row

log = logging.getLogger(__name__)

DEFAULT_CLAIM_LEASE_S = 300.0
RUNNING_VALUES = (MigrationState.RUNNING.value, MigrationState.OFFLINE_RUNNING.value)
#: pg_advisory_xact_lock keys: 7412001 schema changes, 7412002 planners, 7412003 claims.
CLAIM_LOCK_KEY = 7412003
# Key of the database server's start time in a connection's ``info`` (see ``ClaimsTx.stale_before``).
_POSTMASTER_START = "host_engine.postmaster_start"


@dataclass(frozen=True)
class ClaimLimits:
    """How many migrations may run at once (``[concurrency]``), enforced when a claim is taken, across every
    worker on the store. None: no limit of that kind."""

    max_parallel: int | None = None
    max_per_source: int | None = None
    max_per_target: int | None = None


@dataclass(frozen=True)
class RunningCounts:
    """Migrations running now: fleet-wide, out of each source, into each target."""

    total: int
    by_source: Mapping[str, int]
    by_target: Mapping[str, int]

    def full_sources(self, limits: ClaimLimits) -> set[str]:
        cap = limits.max_per_source
        return set() if cap is None else {h for h, n in self.by_source.items() if n >= cap}

    def full_targets(self, limits: ClaimLimits) -> set[str]:
        cap = limits.max_per_target
        return set() if cap is None else {h for h, n in self.by_target.items() if n >= cap}

    def blocked(self, limits: ClaimLimits, source: str, target: str) -> str | None:
        """Why one more migration from ``source`` to ``target`` would exceed a limit; None if it would not."""
        if limits.max_parallel is not None and self.total >= limits.max_parallel:
            return f"{self.total} running fleet-wide (max_parallel {limits.max_parallel})"
        if source in self.full_sources(limits):
            n, cap = self.by_source[source], limits.max_per_source
            return f"{n} running out of {source} (max_per_source {cap})"
        if target in self.full_targets(limits):
            n, cap = self.by_target[target], limits.max_per_target
            return f"{n} running into {target} (max_per_target {cap})"
        return None


class ClaimsTx(MigrationsTx):
    """Claim migrations (under the limits), renew and release claims, find orphans."""

    def claim(
        self,
        worker: str,
        *,
        states: Iterable[MigrationState] = (MigrationState.NOTIFIED,),
        due_by: datetime | None = None,
        lease_s: float = DEFAULT_CLAIM_LEASE_S,
        limit: int = 1,
        migration_id: str | None = None,
        include_own: bool = False,
    ) -> list[Migration]:
        """Claim up to ``limit`` migrations in ``states`` whose ``not_before`` is at or before ``due_by``.

        Unclaimed rows, or rows whose claim is older than ``lease_s`` (a dead worker), qualify. Rows another
        transaction holds are skipped (``SKIP LOCKED``), so concurrent workers never claim the same migration.
        The state does not change; the caller transitions it next with ``worker=`` to prove its claim.
        ``include_own`` also returns rows this worker already holds (a restarted worker taking its work back).
        """
        m = t.migrations
        stale_before = self.stale_before(lease_s)
        eligible: list[sa.ColumnElement[bool]] = [m.c.claimed_by.is_(None)]
        if stale_before is not None:
            eligible.append(m.c.claimed_at < stale_before)
        if include_own:
            eligible.append(m.c.claimed_by == worker)
        q = (
            sa.select(m.c.id, m.c.droplet_id, m.c.claimed_by)
            .where(
                m.c.state.in_([s.value for s in states]),
                sa.or_(*eligible),
            )
            .order_by(m.c.not_before, m.c.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        if due_by is not None:
            q = q.where(m.c.not_before <= due_by)
        if migration_id is not None:
            q = q.where(m.c.id == migration_id)
        rows = self.conn.execute(q).all()
        claimed = []
        for mid, droplet_id, previous in rows:
            self.conn.execute(
                m.update()
                .where(m.c.id == mid)
                .values(claimed_by=worker, claimed_at=self.now, updated_at=self.now)
            )
            note = f"claimed by {worker}" + (
                f" (lease of {previous} expired)" if previous not in (None, worker) else ""
            )
            self.append_log(mid, LogKind.CLAIM, note, droplet_id=droplet_id, data={"worker": worker})
            claimed.append(self.get_migration(mid))
        return claimed

    def lock_claims(self) -> None:
        """Serialize claims fleet-wide for the rest of the transaction, so counting what runs and claiming one
        more is one step across every worker. PostgreSQL: a transaction-scoped advisory lock. SQLite: every
        write transaction already holds the database's write lock (``BEGIN IMMEDIATE``)."""
        if self.postgres:
            self.conn.execute(sa.text(f"SELECT pg_advisory_xact_lock({CLAIM_LOCK_KEY})"))

    def stale_before(self, lease_s: float) -> datetime | None:
        """Claims renewed before this time have expired (their worker is presumed dead); None: none have.

        On PostgreSQL a database that (re)started less than a lease ago expires nothing: while it was down no
        worker could renew, so every claim gets a full lease from the restart before another worker may take
        it over (a store outage must not hand live attempts around)."""
        cutoff = self.now - timedelta(seconds=lease_s)
        if self.db_clock:
            # Read once per database connection: a restarted server has closed every connection before it.
            info = self.conn.connection.info
            started = info.get(_POSTMASTER_START)
            if started is None:
                started = self.conn.execute(sa.text("SELECT pg_postmaster_start_time()")).scalar_one()
                info[_POSTMASTER_START] = started
            if started > cutoff:
                return None
        return cutoff

    def running_counts(self) -> RunningCounts:
        """Migrations running now (live or offline copy, whoever holds them), fleet-wide, per source and per
        target: what the limits are checked against."""
        m = t.migrations
        q = (
            sa.select(m.c.source_host, m.c.target_host, sa.func.count())
            .where(m.c.state.in_(RUNNING_VALUES))
            .group_by(m.c.source_host, m.c.target_host)
        )
        by_source: dict[str, int] = {}
        by_target: dict[str, int] = {}
        total = 0
        for source, target, n in self.conn.execute(q):
            by_source[source] = by_source.get(source, 0) + int(n)
            by_target[target] = by_target.get(target, 0) + int(n)
            total += int(n)
        return RunningCounts(total, by_source, by_target)

    def claim_candidates(
        self,
        *,
        lease_s: float,
        limits: ClaimLimits,
        limit: int,
        only: Iterable[str] | None = None,
        exclude: Iterable[str] = (),
    ) -> list[Migration]:
        """Migrations that could start now, oldest window first, at most ``limit``: ``notified`` or
        ``offline_required``, due (``not_before`` passed by the store's clock, or the guest acknowledged
        ``ready``), unclaimed or with an expired claim, and not out of a source or into a target already at
        its limit. A read: :meth:`claim_start` decides, under the claim lock."""
        if limit <= 0:
            return []
        m = t.migrations
        counts = self.running_counts()
        if limits.max_parallel is not None and counts.total >= limits.max_parallel:
            return []
        stale_before = self.stale_before(lease_s)
        free: list[sa.ColumnElement[bool]] = [m.c.claimed_by.is_(None)]
        if stale_before is not None:
            free.append(m.c.claimed_at < stale_before)
        q = (
            sa.select(m)
            .where(
                m.c.state.in_([MigrationState.NOTIFIED.value, MigrationState.OFFLINE_REQUIRED.value]),
                sa.or_(
                    m.c.not_before <= self.now,
                    sa.and_(m.c.state == MigrationState.NOTIFIED.value, m.c.ack == Ack.READY.value),
                ),
                sa.or_(*free),
            )
            .order_by(m.c.not_before, m.c.id)
            .limit(limit)
        )
        full_sources = counts.full_sources(limits)
        full_targets = counts.full_targets(limits)
        if full_sources:
            q = q.where(m.c.source_host.not_in(sorted(full_sources)))
        if full_targets:
            q = q.where(m.c.target_host.not_in(sorted(full_targets)))
        if only is not None:
            q = q.where(m.c.id.in_(sorted(only)))
        skip = sorted(exclude)
        if skip:
            q = q.where(m.c.id.not_in(skip))
        return [migration_from_row(r) for r in self.conn.execute(q).mappings()]

    def claim_start(
        self,
        migration_id: str,
        worker: str,
        *,
        offline: bool,
        lease_s: float,
        limits: ClaimLimits,
        message: str = "",
    ) -> Migration | None:
        """Claim a due migration for ``worker`` and start its next attempt (``running``, or
        ``offline_running`` when ``offline``), in this one transaction, if that keeps every limit; else
        None (nothing written).

        Under the fleet-wide claim lock (:meth:`lock_claims`) it counts what runs and re-checks that the
        migration is still startable, so however many workers claim at once no limit is ever exceeded and no
        migration starts twice. Claim times are the store's clock (the database's on PostgreSQL)."""
        self.lock_claims()
        # Counted before ``now`` is first read: the claim's recorded time is after every end it counted.
        counts = self.running_counts()
        row = self._migration_row(migration_id, for_update=True)
        if row is None:
            raise NotFound(f"unknown migration {migration_id!r}")
        current = MigrationState(row["state"])
        if current not in (MigrationState.NOTIFIED, MigrationState.OFFLINE_REQUIRED):
            return None
        due = row["not_before"] <= self.now or (
            current is MigrationState.NOTIFIED and row["ack"] == Ack.READY
        )
        stale_before = self.stale_before(lease_s)
        previous = row["claimed_by"]
        claimed_at = row["claimed_at"]
        expired = stale_before is not None and claimed_at is not None and claimed_at < stale_before
        free = previous is None or previous == worker or expired
        if not (due and free):
            return None
        blocked = counts.blocked(limits, row["source_host"], row["target_host"])
        if blocked is not None:
            log.debug("migration_id=%s not claimed: %s", migration_id, blocked)
            return None
        note = f"claimed by {worker}" + (
            f" (lease of {previous} expired)" if previous not in (None, worker) else ""
        )
        self.append_log(
            migration_id, LogKind.CLAIM, note, droplet_id=row["droplet_id"], data={"worker": worker}
        )
        attempt = int(row["attempt"]) + 1
        return self.transition(
            migration_id,
            MigrationState.OFFLINE_RUNNING if offline else MigrationState.RUNNING,
            message=message
            or f"attempt {attempt} ({'offline copy' if offline else 'live'}) "
            f"{row['source_host']} -> {row['target_host']} on {worker}",
            claimed_by=worker,
            claimed_at=self.now,
            attempt=attempt,
            offline=offline,
            started_at=self.now,
        )

    def renew_claims(self, worker: str, migration_ids: Iterable[str]) -> dict[str, Migration]:
        """Renew ``worker``'s claims on these migrations (one write); the ones it still holds, by id. An id
        missing from the answer was taken over (its lease expired) or finished by someone else."""
        ids = sorted(set(migration_ids))
        if not ids:
            return {}
        m = t.migrations
        self.conn.execute(
            m.update().where(m.c.id.in_(ids), m.c.claimed_by == worker).values(claimed_at=self.now)
        )
        q = sa.select(m).where(m.c.id.in_(ids), m.c.claimed_by == worker)
        return {r["id"]: migration_from_row(r) for r in self.conn.execute(q).mappings()}

    def orphans(self, worker: str, *, lease_s: float) -> list[Migration]:
        """Running migrations nobody supervises: unclaimed, claimed by ``worker`` (this worker's previous
        process: the name is held by one live process at a time), or with an expired claim."""
        m = t.migrations
        stale_before = self.stale_before(lease_s)
        mine_or_free: list[sa.ColumnElement[bool]] = [m.c.claimed_by.is_(None), m.c.claimed_by == worker]
        if stale_before is not None:
            mine_or_free.append(m.c.claimed_at < stale_before)
        q = sa.select(m).where(m.c.state.in_(RUNNING_VALUES), sa.or_(*mine_or_free)).order_by(m.c.id)
        return [migration_from_row(r) for r in self.conn.execute(q).mappings()]

    def renew_claim(self, migration_id: str, worker: str) -> Migration:
        """Renew ``worker``'s claim on one migration and return the row (one ``UPDATE ... RETURNING``: every
        progress record of an attempt starts with it). ``StaleClaim`` if another worker holds it (or
        nobody), ``NotFound`` if there is no such migration."""
        m = t.migrations
        row = (
            self.conn.execute(
                m.update()
                .where(m.c.id == migration_id, m.c.claimed_by == worker)
                .values(claimed_at=self.now)
                .returning(*m.c)
            )
            .mappings()
            .first()
        )
        if row is not None:
            return migration_from_row(row)
        holder = self.get_migration(migration_id).claimed_by
        raise StaleClaim(f"migration {migration_id} is claimed by {holder!r}, not {worker!r}")

    def release_claim(self, migration_id: str, worker: str) -> Migration:
        m = self.get_migration(migration_id, for_update=True)
        if m.claimed_by != worker:
            raise StaleClaim(f"migration {migration_id} is claimed by {m.claimed_by!r}, not {worker!r}")
        self.conn.execute(
            t.migrations.update()
            .where(t.migrations.c.id == migration_id)
            .values(claimed_by=None, claimed_at=None, updated_at=self.now)
        )
        self.append_log(migration_id, LogKind.RELEASE, f"released by {worker}", droplet_id=m.droplet_id)
        return self.get_migration(migration_id)
