"""The simulated datacenter kept in the engine's store as rows, shared by every process.

``StoredWorld`` is a ``SimWorld`` whose droplets, images, migrations and hosts are rows of the sim tables
(``host_engine.schema``: ``sim_droplets``, ``sim_images``, ``sim_migrations``, ``sim_hosts``), loaded when
first touched and written back by ``persist`` — only the rows that changed, each under an optimistic
revision check, in one small transaction. So any number of ``host-engine run`` workers and
``migrate --now`` processes drive one world, each advancing the migrations it claimed.

What it derives instead of storing:

- **Which droplets exist**: the store's ``droplets`` table. A droplet without a sim row is simulated with its
  defaults (the ``web`` workload unless told otherwise, its power state from the store, its pristine image);
  its row appears the first time something about it changes (in practice: its first migration). A droplet
  added with ``host-engine droplet add`` or ``inventory sync`` is therefore part of the world at once.
- **Which hosts exist**: the store's ``hosts`` table, every host not declared as libvirt (its URI), with its
  NIC and crashed flag from ``sim_hosts`` when they differ from the defaults.
- **Where a droplet runs**: the store's ``droplets.host``, unless a sim migration of that droplet has
  switched over (phase ``done``) from that very host — then its target. The sim never records a host of its
  own, so it cannot disagree with the store in any other way: "the store says the source, the sim the
  target" means exactly "switched over, completion not recorded yet", which the executor's recovery turns
  into ``completed`` (the sim is the hypervisor: the engine's record follows it, as it follows libvirt).
  The sim reaches ``done`` and removes the source image (``finalize``) and persists that *before* the
  executor's completion transaction, so the store can never be ahead of the sim; a crash in between leaves
  the sim ahead, which recovery resolves. A ``done`` row is deleted once the store has recorded the move
  (its host is no longer the row's source), so it never redirects a later migration.

Each process keeps in memory only what the migrations it drives use; everything else is read fresh when
asked (``domain_state``) and dropped after each ``persist``, so no stale copy outlives a tick. A row changed
by another process since it was loaded is never overwritten: the write is skipped, logged, and this process's
copy dropped (its migration then sees the other process's state).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import sqlalchemy as sa

from host_engine import schema as t
from host_engine.drivers.base import DomainState, Phase
from host_engine.drivers.sim import codec
from host_engine.drivers.sim.faults import Fault, fault_from_dict, fault_to_dict
from host_engine.drivers.sim.model import (
    DEFAULT_STEP_S,
    Droplet,
    Host,
    Image,
    Migration,
    SimWorld,
    new_droplet,
    pristine_image,
)
from host_engine.drivers.sim.rows import (
    Lazy,
    WriteCounts,
    fingerprint,
    image_fingerprint,
    insert_if_absent,
    key_values,
    payload_bytes,
    row_of,
)
from host_engine.drivers.sim.workloads import DEFAULT_NIC_BPS, WORKLOADS, Workload
from host_engine.errors import StoreError
from host_engine.inventory import DriverKind, driver_kind
from host_engine.states import PowerState
from host_engine.store import Store, Tx

log = logging.getLogger(__name__)

#: The workload a droplet is simulated with until told otherwise.
DEFAULT_WORKLOAD = "web"
# Keys in the store's ``sim_world`` key/value table.
META_KEY = "meta"
# The whole world as one JSON value: the format before the sim tables (schema step 3). Nothing reads it any
# more; ``open`` deletes it (it held every image of the world, megabytes in a big one).
LEGACY_WORLD_KEY = "world"
FAULT_KEY_PREFIX = "fault/"
_ACTIVE_PHASES = (Phase.DISK.value, Phase.MEMORY.value, Phase.SWITCHOVER.value)


def _power(value: str) -> DomainState:
    """How the sim starts a droplet the store records with power state ``value``: shut off stays shut off,
    anything else (paused, a value a newer engine wrote) starts running."""
    return DomainState.SHUT_OFF if value == PowerState.SHUT_OFF else DomainState.RUNNING


class StoredWorld(SimWorld):
    """A ``SimWorld`` over the store's sim rows. Build with ``StoredWorld.open(store)``."""

    def __init__(self, store: Store, seed: int, *, step_s: float = DEFAULT_STEP_S) -> None:
        super().__init__(seed, step_s=step_s)
        self.store = store
        self.default_workload = DEFAULT_WORKLOAD
        # [sim] settings (``settings.apply_settings``): a droplet's workload until it has a row, a host's
        # link until it has one; None: the defaults.
        self.workload_of: Callable[[str], Workload] | None = None
        self.link_of: Callable[[str], float] | None = None
        self.droplets: Lazy[str, Droplet] = Lazy(self._load_droplet)
        self.migrations: Lazy[str, Migration] = Lazy(self._load_migration)
        self.writes = WriteCounts()
        # Row key -> (revision loaded, fingerprint loaded); revision None: no row yet.
        self._saved: dict[tuple[str, ...], tuple[int | None, str]] = {}
        self._dropped: set[tuple[str, str]] = set()
        self._driving: set[str] = set()
        # The store outage ``persist`` is riding out (its first error), None while writes go through: an
        # outage is logged once when it starts and once when it ends, not at every tick.
        self._outage: str | None = None
        self.refresh()

    @classmethod
    def open(cls, store: Store, *, seed: int = 0) -> StoredWorld:
        """The store's world; the first process to open it fixes its seed (kept in ``sim_world``)."""
        with store.begin() as tx:
            meta = tx.sim_setdefault(META_KEY, {"seed": seed})  # two processes opening at once agree
            if LEGACY_WORLD_KEY in tx.sim_keys(LEGACY_WORLD_KEY):
                tx.sim_delete(LEGACY_WORLD_KEY)
                log.info(
                    "sim: deleted the pre-rows world row (sim_world key %r); the sim tables hold the world",
                    LEGACY_WORLD_KEY,
                )
        return cls(store, int(meta["seed"]))

    @classmethod
    def read(cls, store: Store) -> StoredWorld:
        """The store's world, to look at: opening it writes nothing."""
        with store.begin(readonly=True) as tx:
            meta = tx.sim_get(META_KEY)
        return cls(store, int(meta["seed"]) if meta else 0)

    # ---- hosts and other processes' load -------------------------------------------------------------------

    def refresh(self) -> None:
        """Re-read the hosts (new ones appear, crashes elsewhere show) and which NICs other processes'
        migrations use. The engine step calls it every tick."""
        with self.store.begin(readonly=True) as tx:
            hosts = tx.conn.execute(sa.select(t.hosts.c.name, t.hosts.c.hypervisor_uri)).all()
            sim_hosts = {r.name: r for r in tx.conn.execute(sa.select(t.sim_hosts))}
            active = tx.conn.execute(
                sa.select(
                    t.sim_migrations.c.id, t.sim_migrations.c.source_host, t.sim_migrations.c.target_host
                ).where(t.sim_migrations.c.phase.in_(_ACTIVE_PHASES))
            ).all()
        fresh: dict[str, Host] = {}
        for name, uri in hosts:
            if driver_kind(uri) is DriverKind.LIBVIRT:
                continue  # a libvirt host is never simulated
            row = sim_hosts.get(name)
            if row is not None:
                host = Host(name, row.nic_bps, row.alive)
            else:
                host = Host(name, self.link_of(name)) if self.link_of is not None else Host(name)
            self._saved[("host", name)] = (row.rev if row is not None else None, self._host_fp(host))
            fresh[name] = host
        self.hosts = fresh
        load: dict[str, tuple[int, int]] = {}
        for mid, source, target in active:
            if mid in self._driving:
                continue
            s, r = load.get(source, (0, 0))
            load[source] = (s + 1, r)
            s, r = load.get(target, (0, 0))
            load[target] = (s, r + 1)
        self.external_load = load

    @staticmethod
    def _host_fp(h: Host) -> str:
        # Plain text, not a hash of JSON: every host of the fleet is fingerprinted twice a tick (1,000 hosts
        # made it a sixth of a bench/fleet.py worker's executor thread).
        return f"{h.nic_bps!r}|{h.alive!r}"

    def add_host(self, name: str, *, nic_bps: float = DEFAULT_NIC_BPS) -> Host:
        """Set a simulated host's NIC (the host itself comes from the store's inventory)."""
        if name not in self.hosts:
            raise KeyError(f"no simulated host {name!r} in the store")
        self.hosts[name].nic_bps = nic_bps
        return self.hosts[name]

    def add_droplet(self, droplet_id: str, host: str, **_: Any) -> Droplet:
        raise TypeError("droplets of a stored world come from the store (host-engine droplet add)")

    def restart_host(self, name: str) -> None:
        self.host(name).alive = True
        with self.store.begin(readonly=True) as tx:
            holding = tx.conn.execute(
                sa.select(t.sim_images.c.droplet_id).where(t.sim_images.c.host == name)
            ).scalars()
            droplet_ids = list(holding)
        for droplet_id in droplet_ids:
            if self.droplet(droplet_id).host != name:
                self.drop_image(droplet_id, name)
        self.persist()

    # ---- droplets --------------------------------------------------------------------------------------

    def _load_droplet(self, droplet_id: str) -> Droplet | None:
        with self.store.begin(readonly=True) as tx:
            row = (
                tx.conn.execute(sa.select(t.droplets).where(t.droplets.c.id == droplet_id)).mappings().first()
            )
            if row is None:
                return None
            sim = (
                tx.conn.execute(sa.select(t.sim_droplets).where(t.sim_droplets.c.droplet_id == droplet_id))
                .mappings()
                .first()
            )
            done = tx.conn.execute(
                sa.select(
                    t.sim_migrations.c.id, t.sim_migrations.c.source_host, t.sim_migrations.c.target_host
                ).where(
                    t.sim_migrations.c.droplet_id == droplet_id, t.sim_migrations.c.phase == Phase.DONE.value
                )
            ).all()
        host: str = row["host"]
        recorded = []
        for mid, source, target in done:
            if source == row["host"]:
                host = target  # switched over; the store has not recorded the move yet
            elif mid not in self.migrations:
                recorded.append(mid)
        if recorded:
            self._forget_recorded(recorded)
        if sim is not None:
            d = codec.droplet_from_dict(droplet_id, host, sim["doc"])
            self._saved[("droplet", droplet_id)] = (sim["rev"], fingerprint(sim["doc"]))
            return d
        # The granularity of the host it appears on, as ``SimWorld.add_droplet`` (and so a forecast) gives it.
        model = self.host_model(host)
        d = new_droplet(
            self.seed,
            droplet_id,
            host,
            memory_bytes=row["memory_bytes"],
            disk_bytes=row["disk_bytes"],
            vcpus=row["vcpus"],
            workload=(
                self.workload_of(droplet_id)
                if self.workload_of is not None
                else WORKLOADS[self.default_workload]()
            ),
            state=_power(row["power_state"]),
            disk_block_bytes=model.disk_block_bytes,
            memory_page_bytes=model.memory_page_bytes,
        )
        self._saved[("droplet", droplet_id)] = (None, fingerprint(codec.droplet_to_dict(d)))
        return d

    def _forget_recorded(self, migration_ids: list[str]) -> None:
        """Delete switched-over migrations whose move the store has recorded (they must not redirect)."""
        with self.store.begin() as tx:
            sm = t.sim_migrations
            gone = tx.conn.execute(
                sm.delete().where(sm.c.id.in_(migration_ids), sm.c.phase == Phase.DONE.value)
            ).rowcount
        self.writes.rows += gone

    def droplet(self, droplet_id: str) -> Droplet:
        return self.droplets[droplet_id]

    def find_droplet(self, droplet_id: str) -> Droplet | None:
        try:
            return self.droplets[droplet_id]
        except KeyError:
            return None

    # ---- images ----------------------------------------------------------------------------------------

    def image(self, droplet_id: str, host: str) -> Image | None:
        key = (droplet_id, host)
        if key in self.images:
            return self.images[key]
        if key in self._dropped:
            return None
        with self.store.begin(readonly=True) as tx:
            row = (
                tx.conn.execute(
                    sa.select(t.sim_images).where(
                        t.sim_images.c.droplet_id == droplet_id, t.sim_images.c.host == host
                    )
                )
                .mappings()
                .first()
            )
        if row is not None:
            image = codec.image_from_bytes(row["disk"], row["memory"])
            self._saved[("image", droplet_id, host)] = (row["rev"], image_fingerprint(image))
        else:
            d = self.find_droplet(droplet_id)
            if d is None or d.host != host:
                return None
            image = pristine_image(d)  # never written since it appeared: no row needed
            self._saved[("image", droplet_id, host)] = (None, image_fingerprint(image))
        self.images[key] = image
        return image

    def put_image(self, droplet_id: str, host: str, image: Image) -> None:
        self._dropped.discard((droplet_id, host))
        self.images[(droplet_id, host)] = image
        # A fresh image replaces whatever row is there (a leftover of an attempt that died before cleaning).
        self._saved.pop(("image", droplet_id, host), None)

    def drop_image(self, droplet_id: str, host: str) -> None:
        self.images.pop((droplet_id, host), None)
        self._saved.pop(("image", droplet_id, host), None)
        self._dropped.add((droplet_id, host))

    def hosts_holding(self, droplet_id: str) -> list[str]:
        with self.store.begin(readonly=True) as tx:
            stored = set(
                tx.conn.execute(
                    sa.select(t.sim_images.c.host).where(t.sim_images.c.droplet_id == droplet_id)
                ).scalars()
            )
        held = {h for d, h in self.images if d == droplet_id}
        dropped = {h for d, h in self._dropped if d == droplet_id}
        d = self.find_droplet(droplet_id)
        running = {d.host} if d is not None else set()
        return sorted((stored - dropped) | held | running)

    # ---- migrations ------------------------------------------------------------------------------------

    def _load_migration(self, migration_id: str) -> Migration | None:
        with self.store.begin(readonly=True) as tx:
            row = (
                tx.conn.execute(sa.select(t.sim_migrations).where(t.sim_migrations.c.id == migration_id))
                .mappings()
                .first()
            )
        if row is None:
            return None
        self._saved[("migration", migration_id)] = (row["rev"], fingerprint(row["doc"]))
        return codec.migration_from_dict(row["doc"])

    def migration(self, migration_id: str) -> Migration | None:
        try:
            return self.migrations[migration_id]
        except KeyError:
            return None

    def add_migration(self, mig: Migration) -> None:
        mid = mig.spec.migration_id
        self.migration(mid)  # load the row it replaces, if any, so the write checks its revision
        self.migrations[mid] = mig
        self._driving.add(mid)

    def driving(self) -> Iterable[Migration]:
        return [self.migrations[mid] for mid in sorted(self._driving) if mid in self.migrations]

    def inject_fault(self, migration_id: str, fault: Fault) -> None:
        """Arm ``fault`` for that migration, whichever process drives (or will drive) it."""
        mig = self.migration(migration_id)
        if mig is not None:
            mig.faults.append(fault)
            self.persist()
            return
        with self.store.begin() as tx:
            key = FAULT_KEY_PREFIX + migration_id
            tx.sim_put(key, [*(tx.sim_get(key, for_update=True) or []), fault_to_dict(fault)])

    def take_pending_faults(self, migration_id: str) -> list[Fault]:
        with self.store.begin() as tx:
            key = FAULT_KEY_PREFIX + migration_id
            armed = tx.sim_get(key, for_update=True)
            if armed is not None:
                tx.sim_delete(key)
        return [fault_from_dict(f) for f in armed or []]

    # ---- writing back ----------------------------------------------------------------------------------

    def persist(self) -> None:
        """Write every changed row in one transaction, then drop what no migration driven here needs.

        If the store cannot be reached nothing is dropped: the changes stay here and go out with the next
        ``persist`` (the engine step calls it before the executor records anything)."""
        conflicts: list[tuple[str, ...]] = []
        saved: dict[tuple[str, ...], tuple[int | None, str]] = {}
        counts = WriteCounts()
        try:
            with self.store.begin() as tx:
                for key, values in self._changes():
                    rev = self._write_row(tx, key, values)
                    if rev is None:
                        conflicts.append(key)
                        continue
                    saved[key] = (rev, self._fingerprint_of(key, values))
                    counts.rows += 1
                    counts.bytes += payload_bytes(values)
                si = t.sim_images
                for droplet_id, host in sorted(self._dropped):
                    gone = tx.conn.execute(
                        si.delete().where(si.c.droplet_id == droplet_id, si.c.host == host)
                    )
                    counts.rows += gone.rowcount
                counts.rows += self._delete_finished(tx)
        except StoreError as e:
            if self._outage is None:
                log.warning("sim: state not saved yet (%s); kept and retried every tick until it is", e)
            self._outage = str(e)
            return
        if self._outage is not None:
            log.warning("sim: state saved again after the store outage (%s)", self._outage)
            self._outage = None
        self._saved.update(saved)
        self.writes.rows += counts.rows
        self.writes.bytes += counts.bytes
        self._dropped.clear()
        for key in conflicts:
            self._conflict(key)
        self._evict()

    def _delete_finished(self, tx: Tx) -> int:
        """Delete the rows of migrations nothing will ask about again: failed and cleaned up (a recovery
        finding no row resumes the source, which is where such a droplet runs), or switched over and
        recorded by the store (the droplet's host is no longer the row's source)."""
        sm, d = t.sim_migrations, t.droplets
        failed = [mid for mid, m in self.migrations.items() if m.finalized and m.phase is Phase.FAILED]
        gone = 0
        if failed:
            gone += tx.conn.execute(sm.delete().where(sm.c.id.in_(failed))).rowcount
            for mid in failed:
                self._saved.pop(("migration", mid), None)
        recorded = sa.select(d.c.id).where(d.c.id == sm.c.droplet_id, d.c.host != sm.c.source_host).exists()
        local = sorted(self.migrations)
        gone += tx.conn.execute(
            sm.delete().where(sm.c.phase == Phase.DONE.value, sm.c.finalized, sm.c.id.not_in(local), recorded)
        ).rowcount
        return gone

    def _changes(self) -> Iterator[tuple[tuple[str, ...], dict[str, Any]]]:
        for name, h in self.hosts.items():
            if self._changed(("host", name), self._host_fp(h)):
                yield ("host", name), {"nic_bps": h.nic_bps, "alive": h.alive}
        for droplet_id, d in list(self.droplets.items()):
            doc = codec.droplet_to_dict(d)
            if self._changed(("droplet", droplet_id), fingerprint(doc)):
                yield ("droplet", droplet_id), {"power_state": d.state.value, "doc": doc}
        for (droplet_id, host), image in list(self.images.items()):
            if self._changed(("image", droplet_id, host), image_fingerprint(image)):
                disk, memory = codec.image_to_bytes(image)
                yield ("image", droplet_id, host), {"disk": disk, "memory": memory}
        for mid, m in list(self.migrations.items()):
            if m.finalized and m.phase is Phase.FAILED:
                continue  # deleted instead (_delete_finished)
            doc = codec.migration_to_dict(m)
            if self._changed(("migration", mid), fingerprint(doc)):
                values = {
                    "droplet_id": m.spec.droplet_id,
                    "source_host": m.spec.source_host,
                    "target_host": m.spec.target_host,
                    "phase": m.phase.value,
                    "finalized": m.finalized,
                    "doc": doc,
                }
                yield ("migration", mid), values

    def _changed(self, key: tuple[str, ...], fingerprint: str) -> bool:
        saved = self._saved.get(key)
        return saved is None or saved[1] != fingerprint

    def _write_row(self, tx: Tx, key: tuple[str, ...], values: dict[str, Any]) -> int | None:
        """Insert or update one row if it is still the revision loaded: its new revision, else None."""
        table, where = row_of(key)
        saved = self._saved.get(key)
        if saved is not None and saved[0] is not None:
            rev = saved[0] + 1
            result = tx.conn.execute(
                table.update()
                .where(*where, table.c.rev == saved[0])
                .values(**values, rev=rev, updated_at=tx.now)
            )
            return rev if result.rowcount == 1 else None
        existing = tx.conn.execute(sa.select(table.c.rev).where(*where)).scalar()
        if existing is not None and saved is not None:
            return None  # another process created the row since this one found none
        rev = (existing or 0) + 1
        if existing is None:
            # Another process may be inserting the same row right now (not visible yet): losing that race is
            # a conflict like any other, not a failed transaction.
            insert = insert_if_absent(tx, table).values(
                **key_values(key), **values, rev=rev, updated_at=tx.now
            )
            inserted = tx.conn.execute(insert.returning(table.c.rev)).first()
            return rev if inserted is not None else None
        else:  # a fresh object replacing a row (a new image over a dead attempt's leftover)
            tx.conn.execute(table.update().where(*where).values(**values, rev=rev, updated_at=tx.now))
        return rev

    def _fingerprint_of(self, key: tuple[str, ...], values: dict[str, Any]) -> str:
        kind = key[0]
        if kind == "host":
            return self._host_fp(self.hosts[key[1]])
        if kind == "image":
            return image_fingerprint(self.images[(key[1], key[2])])
        return fingerprint(values["doc"])

    def _conflict(self, key: tuple[str, ...]) -> None:
        """Another process changed this row since it was loaded: drop our copy and the migration using it."""
        self.writes.conflicts += 1
        log.warning("sim: %s changed in another process; this process's copy is dropped", "/".join(key))
        self._saved.pop(key, None)
        kind = key[0]
        if kind == "droplet":
            self.droplets.pop(key[1], None)
        elif kind == "image":
            self.images.pop((key[1], key[2]), None)
        elif kind == "migration":
            self.migrations.pop(key[1], None)
            self._driving.discard(key[1])
        elif kind == "host":
            self.hosts.pop(key[1], None)
        droplet = key[1] if kind in ("droplet", "image") else None
        for mid in list(self._driving):
            m = self.migrations.get(mid)
            if m is not None and droplet is not None and m.spec.droplet_id == droplet:
                self.migrations.pop(mid, None)
                self._saved.pop(("migration", mid), None)
                self._driving.discard(mid)

    def _evict(self) -> None:
        """Keep only what the unfinished migrations driven here use; the rest is re-read when asked."""
        keep = [
            m for mid in sorted(self._driving) if (m := dict.get(self.migrations, mid)) and not m.finalized
        ]
        self._driving = {m.spec.migration_id for m in keep}
        droplets = {m.spec.droplet_id for m in keep}
        images = {(m.spec.droplet_id, h) for m in keep for h in (m.spec.source_host, m.spec.target_host)}
        for mid in [k for k in self.migrations if k not in self._driving]:
            del self.migrations[mid]
            self._saved.pop(("migration", mid), None)
        for did in [k for k in self.droplets if k not in droplets]:
            del self.droplets[did]
            self._saved.pop(("droplet", did), None)
        for key in [k for k in self.images if k not in images]:
            del self.images[key]
            self._saved.pop(("image", *key), None)


def load_world(store: Store) -> StoredWorld:
    """The simulated datacenter kept in ``store``, to read (``host-engine`` commands, tests)."""
    return StoredWorld.read(store)
