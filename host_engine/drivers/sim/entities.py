"""What the simulated datacenter is made of: hosts, droplets and their images, migrations in flight, and
what the sim knows of each host (``HostModel``: fixed costs, granularity). Plain state and the functions that
build it; how it changes over time is ``host_engine.drivers.sim.model.SimWorld``'s.

Every block and page of a droplet carries a version (the droplet's own write counter, bumped on each
write), so the target can be checked equal to the source at switchover. An image is the pair of version
arrays one host holds for one droplet; a droplet nobody has written since it appeared has its *pristine* image
(``pristine_image``), which never needs storing. Randomness is per droplet (a splitmix64 state seeded from the
world's seed and the droplet id), so a run is deterministic from the seed whatever order droplets appear in.
"""

from __future__ import annotations

import array
import hashlib
import math
from dataclasses import dataclass, field

from host_engine.drivers.base import DomainState, MigrationSpec, Phase
from host_engine.drivers.sim.faults import Fault
from host_engine.drivers.sim.workloads import DEFAULT_NIC_BPS, MiB, Workload, idle

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
      (None: QEMU's 4 KiB / 64 KiB, coarsened for big droplets by ``auto_page_bytes``/``auto_block_bytes``);
    - ``sync_disk_writes``: the disk mirror of migrations out of this host is write-blocking (the libvirt
      driver's default, ``[libvirt] sync_disk_writes``): a guest write completes once it is on both hosts,
      so it crosses the link at the guest's rate and never leaves a dirty block; the background copy goes
      over the allocated disk once, and the pause carries no disk remainder. False: libvirt's background
      mirror, which re-copies the blocks written meanwhile;
    - ``mirror_bps``: how fast the disk mirror's copy may go out of this host (None: as fast as the link).
      libvirt's mirror is one NBD connection while memory goes over several (multifd): on the harness
      memory moved at 1.2-1.3 GB/s and the mirror at about a fifth of that.
    """

    setup_s: float = DEFAULT_SETUP_S
    switchover_ms: float = SWITCHOVER_OVERHEAD_MS
    memory_page_bytes: int | None = None
    disk_block_bytes: int | None = None
    sync_disk_writes: bool = True
    mirror_bps: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.setup_s) and 0 <= self.setup_s <= 3600):
            raise ValueError(f"setup_s must be within 0..3600 s, not {self.setup_s!r}")
        if not (math.isfinite(self.switchover_ms) and 0 <= self.switchover_ms <= 60_000):
            raise ValueError(f"switchover_ms must be within 0..60000 ms, not {self.switchover_ms!r}")
        for name in ("memory_page_bytes", "disk_block_bytes"):
            v = getattr(self, name)
            if v is not None and (v < 512 or v > 1024 * MiB or v & (v - 1)):
                raise ValueError(f"{name} must be a power of two from 512 B to 1 GiB, not {v!r}")
        if not isinstance(self.sync_disk_writes, bool):
            raise ValueError(f"sync_disk_writes must be true or false, not {self.sync_disk_writes!r}")
        mirror = self.mirror_bps
        if mirror is not None and not (math.isfinite(mirror) and 0 < mirror <= 2**60):
            raise ValueError(f"mirror_bps must be above 0 and at most 1 EiB/s, not {self.mirror_bps!r}")


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
    d.disk_hot_start = d.randrange(max(1, disk_span - hot_units(workload.disk_hot_bytes, d, disk=True) + 1))
    d.memory_hot_start = d.randrange(
        max(1, memory_span - hot_units(workload.memory_hot_bytes, d, disk=False) + 1)
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
    # When the switchover ended (within its step): the job's end, which a real driver reports at once.
    ended_at_s: float | None = None
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
    # The write-blocking disk mirror (``HostModel.sync_disk_writes``, option ``sync_writes``), and how fast
    # the guest's writes may cross the link in the current step (its share beside the copy).
    sync_writes: bool = False
    sync_write_bps: float = 0.0
    # The source host's ``HostModel.mirror_bps``: the disk mirror's own limit (None: the link's share).
    mirror_bps: float | None = None
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
    # What the driver reported as memory left: the first reading of the last two rounds it saw
    # (``host_engine.drivers.memory_left.MemoryLeftBound``, as the libvirt driver keeps it).
    left_round_seen: int = -1
    left_round_starts: list[int] = field(default_factory=lambda: [0])
    # Exact integrals, for benchmarks: percent x seconds of throttle, seconds under a disk limit.
    throttle_pct_s: float = 0.0
    disk_limit_s: float = 0.0

    @property
    def active(self) -> bool:
        return self.phase in (Phase.DISK, Phase.MEMORY, Phase.SWITCHOVER)


def hot_units(hot_bytes: int, d: Droplet, *, disk: bool) -> int:
    """How many blocks (``disk``) or pages a hot set of ``hot_bytes`` covers in ``d`` (1 to all)."""
    size, count = (d.disk_block_bytes, d.disk_blocks) if disk else (d.memory_page_bytes, d.memory_pages)
    return max(1, min(count, math.ceil(hot_bytes / size)))
