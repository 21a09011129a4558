"""The simulated datacenter: hosts, NICs, droplets and their images, migrations, in simulated time.

- **Hosts** have a NIC (``nic_bps``, full duplex: a source's transmit side and a target's receive side are
  each shared fairly by the migrations using them) and can crash.
- **Droplets** have a disk of blocks and a memory of pages. Every block and page carries a version (the
  droplet's own write counter, bumped on each write), so the target can be checked equal to the source at
  switchover. An image is the pair of version arrays one host holds for one droplet; a droplet nobody has
  written since it appeared has its *pristine* image (``pristine_image``), which never needs storing.
  Granularity is coarse (``disk_block_bytes``, ``memory_page_bytes``: 16 MiB and 2 MiB by default) so an
  80 GiB droplet is a few thousand entries and migrates in milliseconds of wall time; a workload's rates are
  therefore "bytes made dirty per second", the quantity convergence depends on.
- **Workloads** write to a hot set (random or sequential), at rates the vCPU throttle scales down and the
  disk write limit caps. Versions only advance while a migration watches the droplet: between migrations
  nothing observes them, and skipping that work keeps big worlds cheap (and their stored rows unchanged).
- **Migrations** follow QEMU's shape: a disk mirror (a first pass over every block, then passes over the
  blocks dirtied since), then memory pre-copy rounds (round 1 = every page, then the pages dirtied since),
  the disk mirror still syncing; a switchover pauses the guest, moves the rest, verifies every version and
  only then moves the droplet (one step: it never runs on two hosts, nor on none).

Randomness is per droplet (a splitmix64 state seeded from the world's seed and the droplet id), so a run is
deterministic from the seed whatever order droplets appear in, and whichever process drives them.

What the world is made of is ``entities``; how copies walk and workloads dirty blocks and pages is
``passes``; this module is the world and its time.

``SimWorld`` keeps everything in memory (tests, benchmarks, the demo). Every access to droplets, images and
migrations goes through a few methods (``droplet``, ``image``, ``migration``, ...) that
``host_engine.drivers.sim.stored.StoredWorld`` overrides to load rows from the store on demand.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from host_engine.drivers.base import DomainState, Phase
from host_engine.drivers.sim.entities import (
    DEFAULT_DISK_BLOCK_BYTES,
    DEFAULT_MEMORY_PAGE_BYTES,
    DEFAULT_SETUP_S,
    DEFAULT_STEP_S,
    DISK_READY_S,
    MAX_AUTO_BLOCKS,
    MAX_AUTO_PAGES,
    QEMU_DEFAULT_MAX_DOWNTIME_MS,
    QEMU_MIRROR_GRANULE_BYTES,
    QEMU_PAGE_BYTES,
    RATE_WINDOW_S,
    SWITCHOVER_OVERHEAD_MS,
    Droplet,
    Host,
    HostModel,
    Image,
    Migration,
    auto_block_bytes,
    auto_granularity,
    auto_page_bytes,
    blank_image,
    droplet_seed,
    holds_data,
    hot_units,
    new_droplet,
    place_workload,
    pristine_image,
)
from host_engine.drivers.sim.faults import Fault, FaultKind
from host_engine.drivers.sim.passes import (
    burst_offset_s,
    dirty,
    next_pending,
    periodic_writes,
    unscanned_zero_pages,
    whole_units,
)
from host_engine.drivers.sim.workloads import DEFAULT_NIC_BPS, Pattern, Workload

# The model's names, importable from here as before the split.
__all__ = [
    "DEFAULT_DISK_BLOCK_BYTES",
    "DEFAULT_MEMORY_PAGE_BYTES",
    "DEFAULT_SETUP_S",
    "DEFAULT_STEP_S",
    "DISK_READY_S",
    "MAX_AUTO_BLOCKS",
    "MAX_AUTO_PAGES",
    "QEMU_DEFAULT_MAX_DOWNTIME_MS",
    "QEMU_MIRROR_GRANULE_BYTES",
    "QEMU_PAGE_BYTES",
    "RATE_WINDOW_S",
    "SWITCHOVER_OVERHEAD_MS",
    "Droplet",
    "Host",
    "HostModel",
    "Image",
    "Migration",
    "SimWorld",
    "auto_block_bytes",
    "auto_granularity",
    "auto_page_bytes",
    "bitmap_pages",
    "blank_image",
    "droplet_seed",
    "holds_data",
    "new_droplet",
    "place_workload",
    "pristine_image",
    "reported_pages",
    "unscanned_zero_pages",
]

log = logging.getLogger(__name__)


# --- The world --------------------------------------------------------------------------------------------


def _syncs_in_copy(mig: Migration, d: Droplet) -> bool:
    """Whether QEMU's syncs are modelled within the copy (``SimWorld._qemu_sync``) for this migration: for a
    ``PERIODIC`` memory writer, whose quiet gaps between bursts decide whether QEMU can switch over. A writer
    that writes all the time dirties within any sync interval, so for it the check once a step
    (``_maybe_switch_over``) stands in for them."""
    return d.workload.memory_pattern is Pattern.PERIODIC and not mig.spec.offline


def bitmap_pages(mig: Migration, d: Droplet) -> int:
    """What QEMU's dirty bitmap holds: the pages of the current round not yet sent (and in round 1 the zero
    pages ahead of its scan); pages dirtied since the last sync are not in it until the next."""
    return len(mig.memory_pass) - mig.memory_pos + unscanned_zero_pages(mig, d)


def reported_pages(mig: Migration, d: Droplet) -> int:
    """What QEMU reports as the RAM left during pre-copy (``ram.remaining``): its dirty bitmap, the pages of
    the current round not sent yet (round 1: with the zero pages ahead of its scan), not those the guest
    dirtied since the round's sync; those join at the next sync, which QEMU makes once the bitmap is down to
    its threshold (``bandwidth x downtime limit``, at the rate it measures).

    Uncapped, QEMU's loop checks all the time, so a bitmap below the threshold is gone by the time anyone
    asks, replaced by what that sync found: every page pending. Under a bandwidth cap the loop sleeps out
    each 100 ms window once it has sent the window's share, so the bitmap is what it reports, below the
    threshold too. Measured (QMP ``query-migrate`` every 50 ms): the 8 MiB writer at a 32 MiB/s cap and a
    50 ms limit reads 4.6 MiB, then 1.0 MiB, in each round, while its pause must carry all 8 MiB."""
    bitmap = bitmap_pages(mig, d)
    if mig.round < 2 or mig.cap_bps is not None:
        return bitmap
    limit_ms = mig.max_downtime_ms if mig.max_downtime_ms is not None else QEMU_DEFAULT_MAX_DOWNTIME_MS
    threshold = mig.transfer_rate_bps * limit_ms / 1000.0 / d.memory_page_bytes
    return len(mig.memory_pending) if bitmap <= threshold else bitmap


class SimWorld:
    """A simulated datacenter held in memory. Deterministic from ``seed``; time moves only in ``advance``."""

    def __init__(self, seed: int = 0, *, step_s: float = DEFAULT_STEP_S) -> None:
        self.seed = seed
        self.step_s = step_s
        self.time_s = 0.0
        self.hosts: dict[str, Host] = {}
        self.droplets: dict[str, Droplet] = {}
        self.migrations: dict[str, Migration] = {}
        self.images: dict[tuple[str, str], Image] = {}  # (droplet id, host) -> image
        self.pending_faults: dict[str, list[Fault]] = {}
        # Migrations other processes drive through each host's NIC: host -> (sending, receiving).
        self.external_load: dict[str, tuple[int, int]] = {}
        # Configuration (not state): per-host costs and granularity, and the default for other hosts.
        self.host_models: dict[str, HostModel] = {}
        self.default_host_model = HostModel()

    def host_model(self, name: str) -> HostModel:
        return self.host_models.get(name, self.default_host_model)

    # ---- building ----------------------------------------------------------------------------------------

    def add_host(self, name: str, *, nic_bps: float = DEFAULT_NIC_BPS) -> Host:
        host = Host(name, nic_bps)
        self.hosts[name] = host
        return host

    def add_droplet(
        self,
        droplet_id: str,
        host: str,
        *,
        memory_bytes: int,
        disk_bytes: int,
        vcpus: int = 1,
        workload: Workload | None = None,
        state: DomainState = DomainState.RUNNING,
        disk_block_bytes: int | None = None,
        memory_page_bytes: int | None = None,
    ) -> Droplet:
        """Add a droplet; granularity None: the host model's, else QEMU's (``auto_page_bytes``)."""
        if host not in self.hosts:
            raise KeyError(f"no host {host!r}")
        hm = self.host_model(host)
        d = new_droplet(
            self.seed,
            droplet_id,
            host,
            memory_bytes=memory_bytes,
            disk_bytes=disk_bytes,
            vcpus=vcpus,
            workload=workload,
            state=state,
            disk_block_bytes=disk_block_bytes or hm.disk_block_bytes,
            memory_page_bytes=memory_page_bytes or hm.memory_page_bytes,
        )
        self.droplets[droplet_id] = d
        self.images[(droplet_id, host)] = pristine_image(d)
        return d

    def set_workload(self, droplet_id: str, workload: Workload) -> None:
        """Change what a droplet runs (its hot sets move with it)."""
        place_workload(self.droplet(droplet_id), workload)
        self.persist()

    def inject_fault(self, migration_id: str, fault: Fault) -> None:
        """Arm ``fault`` for the migration with this id (before or after it starts)."""
        mig = self.migration(migration_id)
        if mig is not None:
            mig.faults.append(fault)
        else:
            self.pending_faults.setdefault(migration_id, []).append(fault)

    def restart_host(self, name: str) -> None:
        """A crashed host comes back, empty of droplets it did not run."""
        self.host(name).alive = True
        for droplet_id, host in list(self.images):
            if host == name and self.droplet(droplet_id).host != name:
                self.drop_image(droplet_id, name)

    # ---- access (StoredWorld loads these from the store on demand) ----------------------------------------

    def host(self, name: str) -> Host:
        return self.hosts[name]

    def find_host(self, name: str) -> Host | None:
        return self.hosts.get(name)

    def droplet(self, droplet_id: str) -> Droplet:
        return self.droplets[droplet_id]

    def find_droplet(self, droplet_id: str) -> Droplet | None:
        return self.droplets.get(droplet_id)

    def migration(self, migration_id: str) -> Migration | None:
        return self.migrations.get(migration_id)

    def add_migration(self, mig: Migration) -> None:
        self.migrations[mig.spec.migration_id] = mig

    def take_pending_faults(self, migration_id: str) -> list[Fault]:
        return self.pending_faults.pop(migration_id, [])

    def image(self, droplet_id: str, host: str) -> Image | None:
        return self.images.get((droplet_id, host))

    def put_image(self, droplet_id: str, host: str, image: Image) -> None:
        self.images[(droplet_id, host)] = image

    def drop_image(self, droplet_id: str, host: str) -> None:
        self.images.pop((droplet_id, host), None)

    def driving(self) -> Iterable[Migration]:
        """The migrations this world advances in ``advance``."""
        return self.migrations.values()

    def persist(self) -> None:
        """Make every change so far durable before the caller records an outcome elsewhere (the in-memory
        world has nowhere to put it; ``StoredWorld`` writes its changed rows)."""

    # ---- queries -----------------------------------------------------------------------------------------

    def hosts_holding(self, droplet_id: str) -> list[str]:
        """Every host with an image (running copy or leftover) of the droplet."""
        return sorted(h for d, h in self.images if d == droplet_id)

    def images_equal(self, droplet_id: str, host_a: str, host_b: str) -> bool:
        a = self.image(droplet_id, host_a)
        b = self.image(droplet_id, host_b)
        return a is not None and b is not None and a.disk == b.disk and a.memory == b.memory

    # ---- time --------------------------------------------------------------------------------------------

    def advance(self, seconds: float) -> None:
        """Move simulated time forward by ``seconds`` in steps of ``step_s``."""
        steps = max(1, round(seconds / self.step_s)) if seconds > 0 else 0
        for _ in range(steps):
            self._step(self.step_s)

    def _step(self, dt: float) -> None:
        active = [m for m in self.driving() if m.active]
        for mig in active:
            self._fire_faults(mig)
        active = [m for m in active if m.active]
        for m in active:
            if m.link_back_at_s is not None and self.time_s >= m.link_back_at_s:
                m.link_up, m.link_back_at_s = True, None
        # Fair shares of each host's transmit and receive sides among the migrations that have work, here and
        # in other processes driving the same world.
        senders = [
            m
            for m in active
            if m.link_up and (m.disk_pending or m.memory_pending) and self.time_s >= m.copy_from_s - 1e-9
        ]
        tx = {h: load[0] for h, load in self.external_load.items()}
        rx = {h: load[1] for h, load in self.external_load.items()}
        for m in senders:
            tx[m.spec.source_host] = tx.get(m.spec.source_host, 0) + 1
            rx[m.spec.target_host] = rx.get(m.spec.target_host, 0) + 1
        rates: dict[str, float] = {}
        written_s: dict[str, float] = {}  # how much of the step a split already wrote (a periodic burst)
        for mig in active:
            share = 0.0
            src, dst = self.host(mig.spec.source_host), self.host(mig.spec.target_host)
            if mig in senders:
                share = min(src.nic_bps / tx[src.name], dst.nic_bps / rx[dst.name])
            elif mig.link_up:
                share = min(src.nic_bps, dst.nic_bps)
            rate = self._copy_rate(mig, share)
            if mig not in senders:
                rate = 0.0
            rates[mig.spec.migration_id] = rate
            written_s[mig.spec.migration_id] = self._copy_step(mig, rate, dt)
        # The guest writes after the copy within a step, so what it dirtied in the last step is always still
        # pending: the ~50 ms lag of QEMU's dirty-bitmap sync, which the switchover has to move in the pause.
        # QEMU decides to switch over after syncing its bitmap, so the decision sees those writes too.
        for mig in active:
            if mig.active:
                self._write(mig, dt - written_s.get(mig.spec.migration_id, 0.0))
            rate = rates.get(mig.spec.migration_id, 0.0)
            d = self.droplet(mig.spec.droplet_id)
            if mig.phase is Phase.MEMORY and mig.link_up and rate > 0 and not _syncs_in_copy(mig, d):
                self._maybe_switch_over(mig, d, rate, dt)
            self._account(mig, dt)
        self.time_s += dt

    def _copy_rate(self, mig: Migration, share_bps: float) -> float:
        """The copy's rate out of the migration's share of the link, and (``sync_write_bps``) how fast the
        guest's writes may cross it beside the copy under a write-blocking mirror.

        The cap is a migration parameter that paces pre-copy; QEMU's completion (the pause) sends what is
        left without it, at whatever the link gives. The guest's mirrored writes are not held to the cap:
        they take what they need, and when both they and the copy want more than half the link, each gets
        half. Before memory, the copy is the disk mirror's, at most ``mirror_bps`` (``HostModel``)."""
        rate = share_bps
        if mig.phase is Phase.DISK and mig.mirror_bps is not None:
            rate = min(rate, mig.mirror_bps)
        if mig.cap_bps is not None and not self._completing(mig):
            rate = min(rate, mig.cap_bps)
        mig.sync_write_bps = 0.0
        if self._mirrors_writes(mig):
            guest = self._disk_write_bps(self.droplet(mig.spec.droplet_id))
            mig.sync_write_bps = max(share_bps - rate, min(guest, share_bps / 2.0))
            rate = min(rate, max(0.0, share_bps - min(guest, mig.sync_write_bps)))
        return rate

    @staticmethod
    def _completing(mig: Migration) -> bool:
        """Whether the pause moves what is left without the bandwidth cap: when QEMU switched over by itself
        (its last pass ignores the cap: the 8 MiB writer's 8 MiB in ~50 ms at a 32 MiB/s cap), not when the
        controller paused the guest (``switchover``: the libvirt driver suspends the domain and QEMU goes on
        with rate-limited rounds). Measured with the controller of ``b119ff1``: the 8 MiB writer paused with
        3.3-4.8 MiB left at a 32 MiB/s cap paused 128-206 ms, the remainder at the cap plus the fixed part."""
        return mig.phase is Phase.SWITCHOVER and (mig.auto_switchover or mig.cap_bps is None)

    def _copy_step(self, mig: Migration, rate_bps: float, dt: float) -> float:
        """One step's copy; returns how much of the step the guest has already written (0, or up to a
        periodic writer's burst: the burst splits the step into the copy, and QEMU's syncs (``_copy``), up to
        it, the burst, and the copy after it, since when it falls decides whether QEMU can switch over)."""
        burst_s = self._memory_burst_s(mig, dt)
        if burst_s is None:
            self._copy(mig, rate_bps, dt)
            return 0.0
        self._copy(mig, rate_bps, burst_s)
        if mig.active:
            self._write(mig, burst_s)
        self._copy(mig, rate_bps, dt - burst_s, burst_s)
        return burst_s

    def _fire_faults(self, mig: Migration) -> None:
        if not self.host(mig.spec.target_host).alive:  # crashed under another migration to the same host
            self._fail(mig, f"target host {mig.spec.target_host} is down", target_at_fault=True)
            return
        for fault in list(mig.faults):
            if fault.phase is mig.phase and self.time_s - mig.phase_since_s >= fault.after_s:
                mig.faults.remove(fault)
                self.apply_fault(mig, fault)

    def apply_fault(self, mig: Migration, fault: Fault) -> None:
        log.info(
            "sim: fault %s in %s for migration_id=%s",
            fault.kind.value,
            mig.phase.value,
            mig.spec.migration_id,
        )
        if fault.kind is FaultKind.LINK_DROP:
            mig.link_up = False
            if fault.duration_s is not None:
                mig.link_back_at_s = self.time_s + fault.duration_s
            return
        if fault.kind is FaultKind.TARGET_CRASH:
            self.host(mig.spec.target_host).alive = False
            self._fail(mig, f"target host {mig.spec.target_host} crashed", target_at_fault=True)
        else:
            self._fail(
                mig, f"migration job failed on source host {mig.spec.source_host}", target_at_fault=False
            )

    def _fail(self, mig: Migration, error: str, *, target_at_fault: bool) -> None:
        mig.error = error
        mig.target_at_fault = target_at_fault
        self.set_phase(mig, Phase.FAILED)
        droplet = self.droplet(mig.spec.droplet_id)
        if droplet.host == mig.spec.source_host and droplet.state is DomainState.PAUSED:
            droplet.state = DomainState.RUNNING  # pre-copy: the source still has everything; resume it

    def set_phase(self, mig: Migration, phase: Phase) -> None:
        mig.phase = phase
        mig.phase_since_s = self.time_s

    def _write(self, mig: Migration, dt: float) -> None:
        d = self.droplet(mig.spec.droplet_id)
        if d.state is not DomainState.RUNNING or d.host != mig.spec.source_host:
            return
        image = self.image(d.droplet_id, d.host)
        if image is None:
            return
        wl = d.workload
        disk_rate = self._disk_write_bps(d)
        mirrored = self._mirrors_writes(mig)
        if mirrored:  # each write waits for the target: no faster than the link lets them through
            disk_rate = min(disk_rate, mig.sync_write_bps)
        disk_units = disk_rate * dt / d.disk_block_bytes + d.disk_carry
        memory_units = self._memory_units_per_s(d) * dt + d.memory_carry
        if wl.disk_pattern is Pattern.PERIODIC:
            n_disk, d.disk_carry = periodic_writes(disk_units, hot_units(wl.disk_hot_bytes, d, disk=True))
        else:
            n_disk, d.disk_carry = whole_units(disk_units)
        if wl.memory_pattern is Pattern.PERIODIC:
            hot = hot_units(wl.memory_hot_bytes, d, disk=False)
            n_mem, d.memory_carry = periodic_writes(memory_units, hot)
        else:
            n_mem, d.memory_carry = whole_units(memory_units)
        written: set[int] = set()
        d.disk_cursor = dirty(
            d,
            image.disk,
            written if mirrored else mig.disk_pending,
            d.disk_hot_start,
            hot_units(wl.disk_hot_bytes, d, disk=True),
            n_disk,
            wl.disk_pattern,
            d.disk_cursor,
        )
        # An offline copy has no memory to track (the droplet is off; this never runs then anyway).
        pending = mig.memory_pending if not mig.spec.offline else set()
        before = len(pending)
        d.memory_cursor = dirty(
            d,
            image.memory,
            pending,
            d.memory_hot_start,
            hot_units(wl.memory_hot_bytes, d, disk=False),
            n_mem,
            wl.memory_pattern,
            d.memory_cursor,
        )
        if mirrored:
            # On both hosts at once: never a dirty block (one not yet copied stays in the background copy's
            # pass), every byte written crossing the link.
            target = self.image(d.droplet_id, mig.spec.target_host)
            if target is not None:
                for i in written:
                    target.disk[i] = image.disk[i]
            mig.disk_sent_bytes += n_disk * d.disk_block_bytes
        else:
            mig.window_disk_dirty += n_disk * d.disk_block_bytes
        mig.window_memory_dirty += n_mem * d.memory_page_bytes
        mig.sync_dirty_pages += len(pending) - before

    def _mirrors_writes(self, mig: Migration) -> bool:
        """Whether the guest's disk writes go to both hosts now: a write-blocking mirror (``sync_writes``)
        that has started (after the fixed costs), until the pause."""
        return (
            mig.sync_writes
            and mig.phase in (Phase.DISK, Phase.MEMORY)
            and self.time_s >= mig.copy_from_s - 1e-9
        )

    @staticmethod
    def _disk_write_bps(d: Droplet) -> float:
        """Bytes a second the droplet's workload writes to its disk, under its throttle and disk limit."""
        rate = d.workload.disk_rate_bps * (1.0 - d.throttle_pct / 100.0)
        if d.disk_limit_bps is not None:
            rate = min(rate, float(d.disk_limit_bps))
        return rate

    @staticmethod
    def _memory_units_per_s(d: Droplet) -> float:
        """Pages a second the droplet's workload dirties, under its throttle."""
        return d.workload.memory_rate_bps * (1.0 - d.throttle_pct / 100.0) / d.memory_page_bytes

    def _memory_burst_s(self, mig: Migration, dt: float) -> float | None:
        """When, within the coming step, a ``PERIODIC`` memory writer's next burst comes (None: not in it, or
        not such a writer, or not running where the migration copies from)."""
        d = self.droplet(mig.spec.droplet_id)
        wl = d.workload
        if wl.memory_pattern is not Pattern.PERIODIC or mig.spec.offline:
            return None
        if d.state is not DomainState.RUNNING or d.host != mig.spec.source_host:
            return None
        hot = hot_units(wl.memory_hot_bytes, d, disk=False)
        at = burst_offset_s(d.memory_carry, self._memory_units_per_s(d), hot, dt)
        return at if at is not None and 0.0 < at < dt else None

    def _copy(self, mig: Migration, rate_bps: float, dt: float, offset_s: float = 0.0) -> None:
        d = self.droplet(mig.spec.droplet_id)
        src = self.image(d.droplet_id, mig.spec.source_host)
        dst = self.image(d.droplet_id, mig.spec.target_host)
        if src is None or dst is None:
            return
        had_work = bool(mig.disk_pending or mig.memory_pending)
        credit_before = mig.credit_bytes
        mig.credit_bytes += rate_bps * dt
        moved = 0
        # The disk mirror goes first: it runs all along; memory gets what is left of the link.
        while mig.disk_pending and mig.credit_bytes >= d.disk_block_bytes:
            i = next_pending(mig.disk_pending, mig, disk=True)
            if i is None:
                break
            dst.disk[i] = src.disk[i]
            mig.disk_pending.discard(i)
            mig.credit_bytes -= d.disk_block_bytes
            mig.disk_sent_bytes += d.disk_block_bytes
            moved += d.disk_block_bytes
        self._check_mirror_ready(mig, d, rate_bps)
        round_before = mig.round
        # QEMU's own syncs, for a writer whose bursts leave quiet gaps: ``_qemu_sync`` each time its bitmap
        # drops to the threshold, here in the copy, where the time is known to the byte.
        syncs = mig.phase is Phase.MEMORY and mig.round >= 1 and rate_bps > 0 and _syncs_in_copy(mig, d)
        limit_ms = mig.max_downtime_ms if mig.max_downtime_ms is not None else QEMU_DEFAULT_MAX_DOWNTIME_MS
        threshold_pages = rate_bps * limit_ms / 1000.0 / d.memory_page_bytes
        if mig.phase in (Phase.MEMORY, Phase.SWITCHOVER):
            while True:
                if syncs and mig.phase is Phase.MEMORY and bitmap_pages(mig, d) <= threshold_pages:
                    at_s = self.time_s + offset_s + min(dt, max(0.0, (moved - credit_before) / rate_bps))
                    self._qemu_sync(mig, d, threshold_pages, at_s)
                    round_before = mig.round  # this sync took the round's dirty-rate sample
                if not (mig.memory_pending and mig.credit_bytes >= d.memory_page_bytes):
                    break
                i = next_pending(mig.memory_pending, mig, disk=False)
                if i is None:
                    break
                dst.memory[i] = src.memory[i]
                mig.memory_pending.discard(i)
                mig.credit_bytes -= d.memory_page_bytes
                mig.memory_sent_bytes += d.memory_page_bytes
                moved += d.memory_page_bytes
        if mig.phase is Phase.MEMORY and mig.round > round_before:
            self._dirty_sync(mig, d)
        largest = max(d.disk_block_bytes, d.memory_page_bytes)
        if not (mig.disk_pending or mig.memory_pending):
            mig.credit_bytes = min(mig.credit_bytes, float(largest))  # no banking while idle
        mig.window_moved += moved
        if had_work and rate_bps > 0:
            mig.window_active_s += dt
        if mig.phase is Phase.SWITCHOVER and not mig.disk_pending and not mig.memory_pending and mig.link_up:
            # When, within this step, the last byte went out: the pause ends there, not at the step's end.
            used_s = max(0.0, (moved - credit_before) / rate_bps) if rate_bps > 0 else 0.0
            self._commit(mig, self.time_s + offset_s + min(dt, used_s))

    def _check_mirror_ready(self, mig: Migration, d: Droplet, rate_bps: float) -> None:
        """Memory pre-copy starts once the mirror's first pass is done and what is left moves in 1 s."""
        if mig.disk_pass and mig.disk_pos >= len(mig.disk_pass):
            mig.disk_first_pass_done = True
        if mig.phase is Phase.DISK and (mig.disk_first_pass_done or not mig.disk_pass):
            ready = len(mig.disk_pending) * d.disk_block_bytes <= max(rate_bps, 1.0) * DISK_READY_S
            if ready:
                self.set_phase(mig, Phase.MEMORY)
                mig.memory_pass = [] if mig.spec.offline else sorted(mig.memory_pending)
                mig.memory_pos = 0
                mig.round = 0 if mig.spec.offline else 1
                mig.sync_at_s, mig.sync_dirty_pages = self.time_s, 0

    def _dirty_sync(self, mig: Migration, d: Droplet) -> None:
        """QEMU's dirty-bitmap sync that starts a memory round: the dirty rate it reports is the pages newly
        dirtied since the last sync over the time between them (so a hot set rewritten many times a round
        reads as its size over the round's length: 48 MiB rewritten 18x/s read 31.6 MiB/s at a 32 MiB/s cap);
        none is reported before the first round ends."""
        span = self.time_s - mig.sync_at_s
        if span > 0:
            mig.memory_dirty_rate_bps = mig.sync_dirty_pages * d.memory_page_bytes / span
        mig.sync_at_s, mig.sync_dirty_pages = self.time_s, 0

    def _qemu_sync(self, mig: Migration, d: Droplet, threshold_pages: float, at_s: float) -> None:
        """QEMU's dirty sync once its bitmap (what is left of the round) drops to the threshold
        (``bandwidth x downtime limit``): what the guest dirtied since the last sync joins the bitmap and a
        new round starts; if the bitmap then still fits, QEMU pauses the guest at ``at_s`` and completes.

        So it switches over only if the guest wrote nothing since the sync before, between two bursts of a
        periodic writer: with a hot set larger than the threshold, each round ends in a sync that finds the
        burst, until one falls into a gap (measured: the 48 MiB writer at a 50 ms limit and ~450 MiB/s,
        threshold ~23 MiB, completed by itself after 4-7 rounds, its pauses 29-44 ms)."""
        mig.memory_pass = sorted(mig.memory_pending)
        mig.memory_pos = 0
        mig.round += 1
        self._dirty_sync(mig, d)
        if bitmap_pages(mig, d) <= threshold_pages:
            self._pause(mig, d, at_s)

    def _pause(self, mig: Migration, d: Droplet, at_s: float) -> None:
        """QEMU's switchover: the guest stops at ``at_s``; the remainder moves in the pause."""
        if d.state is DomainState.RUNNING:
            d.state = DomainState.PAUSED
        mig.auto_switchover = True
        mig.switchover_at_s = at_s
        self.set_phase(mig, Phase.SWITCHOVER)
        mig.phase_since_s = at_s

    def _maybe_switch_over(self, mig: Migration, d: Droplet, rate_bps: float, dt: float) -> None:
        """QEMU's own switchover: once the RAM still to send fits the downtime limit at the rate it measures
        (``threshold_size = bandwidth x downtime_limit``), it pauses the guest and completes, whoever drives
        the migration. The disk mirror's remainder is not counted (it is flushed in the pause, so it lengthens
        the downtime, as on real hosts)."""
        limit_ms = mig.max_downtime_ms if mig.max_downtime_ms is not None else QEMU_DEFAULT_MAX_DOWNTIME_MS
        left = (len(mig.memory_pending) + unscanned_zero_pages(mig, d)) * d.memory_page_bytes
        if mig.round < 1 or left > rate_bps * limit_ms / 1000.0:
            return
        mig.credit_bytes = 0.0
        self._pause(mig, d, self.time_s + dt)  # the pause starts where this step ends

    def _commit(self, mig: Migration, end_s: float) -> None:
        """The switchover's last step: verify every version, then move the droplet in one step."""
        spec = mig.spec
        d = self.droplet(spec.droplet_id)
        if spec.offline:  # a shut-off droplet has no memory to carry: its disk is all there is
            src = self.image(spec.droplet_id, spec.source_host)
            dst = self.image(spec.droplet_id, spec.target_host)
            mig.verified = src is not None and dst is not None and src.disk == dst.disk
        else:
            mig.verified = self.images_equal(spec.droplet_id, spec.source_host, spec.target_host)
        if not mig.verified:
            self._fail(
                mig, "verification failed: target differs from source at switchover", target_at_fault=False
            )
            return
        started_s = mig.switchover_at_s if mig.switchover_at_s is not None else end_s
        mig.downtime_ms = max(0.0, end_s - started_s) * 1000.0 + mig.switchover_ms
        mig.ended_at_s = end_s + mig.switchover_ms / 1000.0
        d.host = spec.target_host
        # The target's QEMU starts with neither the temporary disk limit nor the throttle.
        d.throttle_pct = 0
        d.disk_limit_bps = None
        if spec.offline:
            d.state = DomainState.RUNNING if spec.power_on_after else DomainState.SHUT_OFF
        else:
            d.state = DomainState.RUNNING
        self.set_phase(mig, Phase.DONE)
        # The job ends when the target resumes: the pause's start plus its downtime (libvirt's completed
        # job reports its elapsed time so), which lets a report place the switchover no tick saw.
        mig.phase_since_s = started_s + mig.downtime_ms / 1000.0

    def _account(self, mig: Migration, dt: float) -> None:
        d = self.droplet(mig.spec.droplet_id)
        if d.host == mig.spec.source_host and mig.phase is not Phase.DONE:
            mig.throttle_pct_s += d.throttle_pct * dt
            if d.disk_limit_bps is not None:
                mig.disk_limit_s += dt
        span = self.time_s + dt - mig.window_start_s
        if span >= RATE_WINDOW_S - 1e-9:
            if mig.window_active_s > 0:
                mig.transfer_rate_bps = mig.window_moved / mig.window_active_s
            elif not mig.link_up:
                mig.transfer_rate_bps = 0.0
            mig.disk_dirty_rate_bps = mig.window_disk_dirty / span
            mig.window_start_s = self.time_s + dt
            mig.window_moved = mig.window_disk_dirty = mig.window_memory_dirty = 0
            mig.window_active_s = 0.0
