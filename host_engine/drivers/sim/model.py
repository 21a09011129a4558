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

``SimWorld`` keeps everything in memory (tests, benchmarks, the demo). Every access to droplets, images and
migrations goes through a few methods (``droplet``, ``image``, ``migration``, ...) that
``host_engine.drivers.sim.stored.StoredWorld`` overrides to load rows from the store on demand.
"""

from __future__ import annotations

import array
import hashlib
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from host_engine.drivers.base import DomainState, MigrationSpec, Phase
from host_engine.drivers.sim.faults import Fault, FaultKind
from host_engine.drivers.sim.workloads import DEFAULT_NIC_BPS, MiB, Pattern, Workload, idle

log = logging.getLogger(__name__)

DEFAULT_DISK_BLOCK_BYTES = 16 * 1024 * 1024
DEFAULT_MEMORY_PAGE_BYTES = 2 * 1024 * 1024
# QEMU's own granularity (a 4 KiB page; libvirt's NBD mirror works in 64 KiB granules): what the sim uses
# when nothing is configured, coarsened only as far as keeps a droplet's arrays small (``auto_page_bytes``).
QEMU_PAGE_BYTES = 4 * 1024
QEMU_MIRROR_GRANULE_BYTES = 64 * 1024
MAX_AUTO_PAGES = 32 * 1024
MAX_AUTO_BLOCKS = 4 * 1024
# QEMU's default downtime limit (``downtime-limit``), in force until someone sets another.
QEMU_DEFAULT_MAX_DOWNTIME_MS = 300
# What a migration costs besides moving bytes, measured on the two-host libvirt harness: target preparation
# through the storage API, the target QEMU's start and libvirt's begin/confirm (~2.7 s there).
DEFAULT_SETUP_S = 2.7
# Simulation step: 50 ms keeps a 300 ms downtime budget resolved to a sixth.
DEFAULT_STEP_S = 0.05
# Rates are measured over 1 s windows, like QEMU's dirty-rate sync.
RATE_WINDOW_S = 1.0
# A switchover's fixed cost beyond moving bytes (device state, resume on the target): the notes measured
# 30-60 ms total downtime at unlimited bandwidth on the veth.
SWITCHOVER_OVERHEAD_MS = 30.0
# The mirror is "ready" (memory pre-copy may start) once its first pass is done and what is left moves in 1 s.
DISK_READY_S = 1.0

_MASK64 = (1 << 64) - 1


def droplet_seed(seed: int, droplet_id: str) -> int:
    """The initial random state of one droplet: the same for a droplet id and world seed in every process."""
    digest = hashlib.blake2b(f"{seed}:{droplet_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def auto_granularity(size_bytes: int, smallest: int, max_count: int) -> int:
    """The smallest power of two >= ``smallest`` that cuts ``size_bytes`` into at most ``max_count`` pieces.

    >>> auto_granularity(128 * 1024 * 1024, 4096, 32768)  # a 128 MiB guest: QEMU's own 4 KiB pages
    4096
    >>> auto_granularity(8 * 1024**3, 4096, 32768)  # 8 GiB: 256 KiB, so 32768 entries
    262144
    """
    g = smallest
    while math.ceil(size_bytes / g) > max_count:
        g *= 2
    return g


def auto_page_bytes(memory_bytes: int) -> int:
    return auto_granularity(memory_bytes, QEMU_PAGE_BYTES, MAX_AUTO_PAGES)


def auto_block_bytes(disk_bytes: int) -> int:
    return auto_granularity(disk_bytes, QEMU_MIRROR_GRANULE_BYTES, MAX_AUTO_BLOCKS)


# --- Model state ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostModel:
    """What the sim knows of a host beyond its NIC: costs measured (or calibrated) and its granularity.

    Configuration, not state: every process builds the same from the config, so the stored world keeps
    none of it (a migration copies what it needs when it starts).

    - ``setup_s``: from the job's start to its first byte (target preparation, target QEMU start, begin and
      confirm), paid once per migration on the target's side;
    - ``switchover_ms``: the pause's cost beyond moving the remainder (device state, resume);
    - ``memory_page_bytes`` / ``disk_block_bytes``: the granularity of droplets that appear on this host
      (None: QEMU's 4 KiB / 64 KiB, coarsened for big droplets by ``auto_page_bytes``/``auto_block_bytes``).
    """

    setup_s: float = DEFAULT_SETUP_S
    switchover_ms: float = SWITCHOVER_OVERHEAD_MS
    memory_page_bytes: int | None = None
    disk_block_bytes: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.setup_s) and 0 <= self.setup_s <= 3600):
            raise ValueError(f"setup_s must be within 0..3600 s, not {self.setup_s!r}")
        if not (math.isfinite(self.switchover_ms) and 0 <= self.switchover_ms <= 60_000):
            raise ValueError(f"switchover_ms must be within 0..60000 ms, not {self.switchover_ms!r}")
        for name in ("memory_page_bytes", "disk_block_bytes"):
            v = getattr(self, name)
            if v is not None and (v < 512 or v > 1024 * MiB or v & (v - 1)):
                raise ValueError(f"{name} must be a power of two from 512 B to 1 GiB, not {v!r}")


@dataclass(eq=False)
class Host:
    name: str
    nic_bps: float = DEFAULT_NIC_BPS
    alive: bool = True


@dataclass(eq=False)
class Image:
    disk: array.array[int]
    memory: array.array[int]


@dataclass(eq=False)
class Droplet:
    droplet_id: str
    host: str
    memory_bytes: int
    disk_bytes: int
    vcpus: int = 1
    workload: Workload = field(default_factory=Workload)
    state: DomainState = DomainState.RUNNING
    disk_block_bytes: int = DEFAULT_DISK_BLOCK_BYTES
    memory_page_bytes: int = DEFAULT_MEMORY_PAGE_BYTES
    throttle_pct: int = 0
    disk_limit_bps: int | None = None
    # Workload bookkeeping: fractional writes carried between steps, sequential cursors, hot set offsets.
    disk_carry: float = 0.0
    memory_carry: float = 0.0
    disk_cursor: int = 0
    memory_cursor: int = 0
    disk_hot_start: int = 0
    memory_hot_start: int = 0
    # The last version written to any block or page of this droplet; the random state of its workload.
    version: int = 0
    rng: int = 0

    @property
    def disk_blocks(self) -> int:
        return max(1, math.ceil(self.disk_bytes / self.disk_block_bytes))

    @property
    def memory_pages(self) -> int:
        return max(1, math.ceil(self.memory_bytes / self.memory_page_bytes))

    def randrange(self, n: int) -> int:
        """A number in ``[0, n)`` from this droplet's splitmix64 stream."""
        self.rng = (self.rng + 0x9E3779B97F4A7C15) & _MASK64
        z = self.rng
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        return (((z ^ (z >> 31)) & _MASK64) * n) >> 64

    def bump(self) -> int:
        self.version += 1
        return self.version


def new_droplet(
    seed: int,
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
    """A droplet as it first appears: hot sets placed from its own random stream, its pristine image's
    versions (``1..blocks+pages``) already counted. Granularity None: ``auto_block_bytes`` /
    ``auto_page_bytes`` of its size."""
    d = Droplet(
        droplet_id,
        host,
        memory_bytes,
        disk_bytes,
        vcpus,
        workload or idle(),
        state,
        disk_block_bytes or auto_block_bytes(disk_bytes),
        memory_page_bytes or auto_page_bytes(memory_bytes),
        rng=droplet_seed(seed, droplet_id),
    )
    place_workload(d, d.workload)
    d.version = d.disk_blocks + d.memory_pages
    return d


def place_workload(d: Droplet, workload: Workload) -> None:
    """Run ``workload`` on ``d``: its hot sets placed from the droplet's own random stream, inside the memory
    it holds (``memory_resident_bytes``) and the disk it has allocated (``disk_allocated_bytes``) when those
    are given: what a guest keeps rewriting is memory it has written, so it never adds zero pages to the
    copy (a hot set placed among them would make resident + hot bytes to send, not resident)."""
    d.workload = workload
    disk_span = _span(workload.disk_allocated_bytes, d.disk_block_bytes, d.disk_blocks)
    memory_span = _span(workload.memory_resident_bytes, d.memory_page_bytes, d.memory_pages)
    d.disk_hot_start = d.randrange(max(1, disk_span - _blocks(workload.disk_hot_bytes, d, disk=True) + 1))
    d.memory_hot_start = d.randrange(
        max(1, memory_span - _blocks(workload.memory_hot_bytes, d, disk=False) + 1)
    )
    d.disk_cursor = d.disk_hot_start
    d.memory_cursor = d.memory_hot_start


def _span(held_bytes: int | None, unit_bytes: int, count: int) -> int:
    """How many blocks/pages from the start hold data (all of them when ``held_bytes`` is None)."""
    return count if held_bytes is None else max(1, min(count, math.ceil(held_bytes / unit_bytes)))


def pristine_image(d: Droplet) -> Image:
    """The image of a droplet never written since it appeared: distinct non-zero versions throughout."""
    n = d.disk_blocks
    return Image(array.array("q", range(1, n + 1)), array.array("q", range(n + 1, n + d.memory_pages + 1)))


def holds_data(d: Droplet, image: Image) -> tuple[set[int], set[int]]:
    """The blocks and pages of ``d`` that hold data: allocated or resident by the workload's figures, or
    written since the droplet appeared. The rest are zero (never-written RAM, unallocated clusters), which
    QEMU does not send (a zero page costs a few header bytes) and the mirror does not copy."""
    wl = d.workload
    blocks = d.disk_blocks
    alloc = (
        blocks if wl.disk_allocated_bytes is None else math.ceil(wl.disk_allocated_bytes / d.disk_block_bytes)
    )
    disk = set(range(min(blocks, alloc)))
    disk.update(i for i in range(blocks) if image.disk[i] != i + 1)
    memory: set[int] = set()
    pages = d.memory_pages
    if wl.memory_resident_bytes is None:
        memory.update(range(pages))
    else:
        memory.update(range(min(pages, math.ceil(wl.memory_resident_bytes / d.memory_page_bytes))))
        memory.update(i for i in range(pages) if image.memory[i] != blocks + i + 1)
    return disk, memory


def blank_image(d: Droplet) -> Image:
    """A target's image before the copy: every version 0, which no source block has."""
    return Image(array.array("q", bytes(8 * d.disk_blocks)), array.array("q", bytes(8 * d.memory_pages)))


@dataclass(eq=False)
class Migration:
    spec: MigrationSpec
    phase: Phase = Phase.PREPARING
    started_at_s: float = 0.0
    phase_since_s: float = 0.0
    round: int = 0
    disk_pending: set[int] = field(default_factory=set)
    disk_pass: list[int] = field(default_factory=list)
    disk_pos: int = 0
    disk_first_pass_done: bool = False
    memory_pending: set[int] = field(default_factory=set)
    memory_pass: list[int] = field(default_factory=list)
    memory_pos: int = 0
    credit_bytes: float = 0.0
    link_up: bool = True
    link_back_at_s: float | None = None
    disk_sent_bytes: int = 0
    memory_sent_bytes: int = 0
    max_downtime_ms: int | None = None
    switchover_at_s: float | None = None
    downtime_ms: float | None = None
    error: str | None = None
    target_at_fault: bool = False
    verified: bool | None = None
    faults: list[Fault] = field(default_factory=list)
    finalized: bool = False
    # Set when the job starts: the bandwidth cap (the migration parameter, None: the link), when the first
    # byte may go (after the fixed costs), the switchover's cost, and whether QEMU switched over by itself.
    cap_bps: float | None = None
    copy_from_s: float = 0.0
    switchover_ms: float = SWITCHOVER_OVERHEAD_MS
    auto_switchover: bool = False
    # Rate windows.
    window_start_s: float = 0.0
    window_moved: int = 0
    window_active_s: float = 0.0
    window_disk_dirty: int = 0
    window_memory_dirty: int = 0
    transfer_rate_bps: float = 0.0
    disk_dirty_rate_bps: float = 0.0
    memory_dirty_rate_bps: float = 0.0
    # QEMU's dirty sync, once per memory round: when the last one was, and the pages newly dirtied since (a
    # page counts once however often it is rewritten).
    sync_at_s: float = 0.0
    sync_dirty_pages: int = 0
    # Exact integrals, for benchmarks: percent x seconds of throttle, seconds under a disk limit.
    throttle_pct_s: float = 0.0
    disk_limit_s: float = 0.0

    @property
    def active(self) -> bool:
        return self.phase in (Phase.DISK, Phase.MEMORY, Phase.SWITCHOVER)


# --- The world --------------------------------------------------------------------------------------------


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
        for mig in active:
            rate = 0.0
            if mig in senders:
                src, dst = self.host(mig.spec.source_host), self.host(mig.spec.target_host)
                rate = min(src.nic_bps / tx[src.name], dst.nic_bps / rx[dst.name])
                # The cap is a migration parameter that paces pre-copy; QEMU's completion (the pause) sends
                # what is left without it, at whatever the link gives.
                if mig.cap_bps is not None and mig.phase is not Phase.SWITCHOVER:
                    rate = min(rate, mig.cap_bps)
            rates[mig.spec.migration_id] = rate
            self._copy(mig, rate, dt)
        # The guest writes after the copy within a step, so what it dirtied in the last step is always still
        # pending: the ~50 ms lag of QEMU's dirty-bitmap sync, which the switchover has to move in the pause.
        # QEMU decides to switch over after syncing its bitmap, so the decision sees those writes too.
        for mig in active:
            if mig.active:
                self._write(mig, dt)
            rate = rates.get(mig.spec.migration_id, 0.0)
            if mig.phase is Phase.MEMORY and mig.link_up and rate > 0:
                self._maybe_switch_over(mig, self.droplet(mig.spec.droplet_id), rate, dt)
            self._account(mig, dt)
        self.time_s += dt

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
        slow = 1.0 - d.throttle_pct / 100.0
        disk_rate = wl.disk_rate_bps * slow
        if d.disk_limit_bps is not None:
            disk_rate = min(disk_rate, float(d.disk_limit_bps))
        n_disk, d.disk_carry = _whole(disk_rate * dt / d.disk_block_bytes + d.disk_carry)
        n_mem, d.memory_carry = _whole(wl.memory_rate_bps * slow * dt / d.memory_page_bytes + d.memory_carry)
        d.disk_cursor = _dirty(
            d,
            image.disk,
            mig.disk_pending,
            d.disk_hot_start,
            _blocks(wl.disk_hot_bytes, d, disk=True),
            n_disk,
            wl.disk_pattern,
            d.disk_cursor,
        )
        # An offline copy has no memory to track (the droplet is off; this never runs then anyway).
        pending = mig.memory_pending if not mig.spec.offline else set()
        before = len(pending)
        d.memory_cursor = _dirty(
            d,
            image.memory,
            pending,
            d.memory_hot_start,
            _blocks(wl.memory_hot_bytes, d, disk=False),
            n_mem,
            wl.memory_pattern,
            d.memory_cursor,
        )
        mig.window_disk_dirty += n_disk * d.disk_block_bytes
        mig.window_memory_dirty += n_mem * d.memory_page_bytes
        mig.sync_dirty_pages += len(pending) - before

    def _copy(self, mig: Migration, rate_bps: float, dt: float) -> None:
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
            i = _next(mig.disk_pending, mig, disk=True)
            if i is None:
                break
            dst.disk[i] = src.disk[i]
            mig.disk_pending.discard(i)
            mig.credit_bytes -= d.disk_block_bytes
            mig.disk_sent_bytes += d.disk_block_bytes
            moved += d.disk_block_bytes
        self._check_mirror_ready(mig, d, rate_bps)
        round_before = mig.round
        if mig.phase in (Phase.MEMORY, Phase.SWITCHOVER):
            while mig.memory_pending and mig.credit_bytes >= d.memory_page_bytes:
                i = _next(mig.memory_pending, mig, disk=False)
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
            self._commit(mig, self.time_s + min(dt, used_s))

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

    def _maybe_switch_over(self, mig: Migration, d: Droplet, rate_bps: float, dt: float) -> None:
        """QEMU's own switchover: once the RAM still to send fits the downtime limit at the rate it measures
        (``threshold_size = bandwidth x downtime_limit``), it pauses the guest and completes, whoever drives
        the migration. The disk mirror's remainder is not counted (it is flushed in the pause, so it lengthens
        the downtime, as on real hosts)."""
        limit_ms = mig.max_downtime_ms if mig.max_downtime_ms is not None else QEMU_DEFAULT_MAX_DOWNTIME_MS
        left = (len(mig.memory_pending) + unscanned_zero_pages(mig, d)) * d.memory_page_bytes
        if mig.round < 1 or left > rate_bps * limit_ms / 1000.0:
            return
        if d.state is DomainState.RUNNING:
            d.state = DomainState.PAUSED
        mig.auto_switchover = True
        mig.switchover_at_s = self.time_s + dt  # the pause starts where this step ends
        mig.credit_bytes = 0.0
        self.set_phase(mig, Phase.SWITCHOVER)
        mig.phase_since_s = self.time_s + dt

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
        d.host = spec.target_host
        # The target's QEMU starts with neither the temporary disk limit nor the throttle.
        d.throttle_pct = 0
        d.disk_limit_bps = None
        if spec.offline:
            d.state = DomainState.RUNNING if spec.power_on_after else DomainState.SHUT_OFF
        else:
            d.state = DomainState.RUNNING
        self.set_phase(mig, Phase.DONE)

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


def unscanned_zero_pages(mig: Migration, d: Droplet) -> int:
    """Zero pages QEMU's first memory round has not reached yet.

    QEMU's dirty bitmap starts with every page set, zero pages included, and a page leaves it only when the
    round's scan reaches it (a zero page then costs a few header bytes). So during round 1 the remainder
    QEMU compares with ``bandwidth x downtime limit`` still counts the zero pages ahead of the scan: a guest
    with a big hot set at the start of its RAM is not switched over the moment round 1 starts, but only once
    the scan has passed enough of the RAM (measured: the 48 MiB writer sent ~50 MiB in round 1, then its
    48 MiB hot set in the pause). The sim sends only pages that hold data, in address order; the zero pages
    ahead are those past the next page to send, less the data pages still to send.
    """
    if mig.round != 1 or mig.spec.offline:
        return 0
    ahead = len(mig.memory_pass) - mig.memory_pos
    at = mig.memory_pass[mig.memory_pos] if ahead > 0 else d.memory_pages
    return max(0, d.memory_pages - at - ahead)


def _whole(x: float) -> tuple[int, float]:
    n = math.floor(x)
    return n, x - n


def _blocks(hot_bytes: int, d: Droplet, *, disk: bool) -> int:
    size, count = (d.disk_block_bytes, d.disk_blocks) if disk else (d.memory_page_bytes, d.memory_pages)
    return max(1, min(count, math.ceil(hot_bytes / size)))


def _dirty(
    d: Droplet,
    versions: array.array[int],
    pending: set[int],
    start: int,
    hot: int,
    n: int,
    pattern: Pattern,
    cursor: int,
) -> int:
    """Write ``n`` blocks of the hot set ``[start, start + hot)``; returns the new sequential cursor."""
    if pattern is Pattern.SEQUENTIAL and n >= hot:
        # A sweep over the whole hot set (the diabolical guest): every block at once, at C speed.
        versions[start : start + hot] = array.array("q", range(d.version + 1, d.version + hot + 1))
        d.version += hot
        pending.update(range(start, start + hot))
        return start + (cursor - start + n) % hot
    for _ in range(n):
        if pattern is Pattern.SEQUENTIAL:
            i = cursor
            cursor = start + (i - start + 1) % hot
        else:
            i = start + d.randrange(hot)
        versions[i] = d.bump()
        pending.add(i)
    return cursor


def _next(pending: set[int], mig: Migration, *, disk: bool) -> int | None:
    """The next block/page of the current pass that is still pending; starts a new pass when one ends."""
    order = mig.disk_pass if disk else mig.memory_pass
    pos = mig.disk_pos if disk else mig.memory_pos
    for _ in range(2):
        while pos < len(order):
            i = order[pos]
            pos += 1
            if i in pending:
                if disk:
                    mig.disk_pos = pos
                else:
                    mig.memory_pos = pos
                return i
        # Pass over: the next one covers what was dirtied meanwhile (a new memory round).
        if disk:
            mig.disk_first_pass_done = True
        order, pos = sorted(pending), 0
        if disk:
            mig.disk_pass = order
        else:
            mig.memory_pass = order
            mig.round += 1
    return None
