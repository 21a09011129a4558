"""The simulated hypervisor: hosts, NICs, droplets and their workloads, in simulated time (DESIGN.md §7).

It is a real driver (``HypervisorDriver`` / ``MigrationDriver``) over a model datacenter, so it powers the
tests, the demo, the benchmarks and capacity planning. The model:

- **Hosts** have a NIC (``nic_bps``, full duplex: a source's transmit side and a target's receive side are
  each shared fairly by the migrations using them) and can crash.
- **Droplets** have a disk of blocks and a memory of pages. Every block and page carries a version (a world
  counter, bumped on each write), so the target can be checked equal to the source at switchover.
  Granularity is coarse (``disk_block_bytes``, ``memory_page_bytes``: 16 MiB and 2 MiB by default) so an
  80 GiB droplet is a few thousand entries and migrates in milliseconds of wall time; a workload's rates are
  therefore "bytes made dirty per second", the quantity convergence depends on.
- **Workloads** write to a hot set (random or sequential), at rates the vCPU throttle scales down and the
  disk write limit caps. Versions only advance while a migration watches the droplet: between migrations
  nothing observes them, and skipping that work keeps big worlds cheap.
- **Migrations** follow QEMU's shape: a disk mirror (a first pass over every block, then passes over the
  blocks dirtied since), then memory pre-copy rounds (round 1 = every page, then the pages dirtied since),
  the disk mirror still syncing; a switchover pauses the guest, moves the rest, verifies every version and
  only then moves the droplet (one step: it never runs on two hosts, nor on none).
- **Faults** (link drop, target crash, source-side error) can be injected at any phase.

Time only moves when ``SimWorld.advance`` is called (``SimClock.sleep`` calls it), and all randomness comes
from one seeded generator, so a run is deterministic. ``SimWorld.to_dict``/``from_dict`` (and ``to_json``)
round-trip the whole world, so it can live in the store where several processes see it (DESIGN.md §9).
"""

from __future__ import annotations

import array
import base64
import enum
import json
import logging
import math
import random
import zlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from host_engine.drivers.base import DomainState, DriverError, MigrationSpec, Phase, Progress

log = logging.getLogger(__name__)

MiB = 1024 * 1024
GiB = 1024 * MiB

DEFAULT_DISK_BLOCK_BYTES = 16 * MiB
DEFAULT_MEMORY_PAGE_BYTES = 2 * MiB
# 10 Gbit/s: a common hypervisor uplink; the real veth measured 100-230 MB/s, a TCG-bound figure.
DEFAULT_NIC_BPS = 1_250_000_000
# Simulation step: 50 ms keeps a 300 ms downtime budget resolved to a sixth.
DEFAULT_STEP_S = 0.05
# Rates are measured over 1 s windows, like QEMU's dirty-rate sync.
RATE_WINDOW_S = 1.0
# A switchover's fixed cost beyond moving bytes (device state, resume on the target): the notes measured
# 30-60 ms total downtime at unlimited bandwidth on the veth.
SWITCHOVER_OVERHEAD_MS = 30.0
# The mirror is "ready" (memory pre-copy may start) once its first pass is done and what is left moves in 1 s.
DISK_READY_S = 1.0


class Pattern(enum.Enum):
    RANDOM = "random"
    SEQUENTIAL = "sequential"


@dataclass(frozen=True)
class Workload:
    """How a droplet dirties its disk and memory. Rates are before throttling, in bytes per second."""

    name: str = "idle"
    disk_rate_bps: float = 0.0
    disk_hot_bytes: int = 0
    disk_pattern: Pattern = Pattern.RANDOM
    memory_rate_bps: float = 0.0
    memory_hot_bytes: int = 0
    memory_pattern: Pattern = Pattern.RANDOM

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["disk_pattern"] = self.disk_pattern.value
        d["memory_pattern"] = self.memory_pattern.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Workload:
        return cls(
            **{
                **d,
                "disk_pattern": Pattern(d["disk_pattern"]),
                "memory_pattern": Pattern(d["memory_pattern"]),
            }
        )


# --- Workload models (all parameterised; defaults sized for a 10 Gbit/s link) ---------------------------


def idle(*, disk_rate_bps: float = 64 * 1024, memory_rate_bps: float = 1 * MiB) -> Workload:
    """A droplet doing nearly nothing: timers, a cron job, the odd log line."""
    return Workload("idle", disk_rate_bps, 64 * MiB, Pattern.RANDOM, memory_rate_bps, 64 * MiB)


def web(
    *,
    disk_rate_bps: float = 2 * MiB,
    disk_hot_bytes: int = 1 * GiB,
    memory_rate_bps: float = 40 * MiB,
    memory_hot_bytes: int = 256 * MiB,
) -> Workload:
    """A web server: low write rates over small hot sets (access logs, session cache, request buffers)."""
    return Workload("web", disk_rate_bps, disk_hot_bytes, Pattern.RANDOM, memory_rate_bps, memory_hot_bytes)


def database(
    *,
    disk_rate_bps: float = 1000 * MiB,
    disk_hot_bytes: int = 8 * GiB,
    memory_rate_bps: float = 200 * MiB,
    memory_hot_bytes: int = 2 * GiB,
) -> Workload:
    """A busy database: random writes over a large hot set, near the link rate (checkpoints, WAL, indexes)."""
    return Workload(
        "database", disk_rate_bps, disk_hot_bytes, Pattern.RANDOM, memory_rate_bps, memory_hot_bytes
    )


def log_writer(
    *,
    disk_rate_bps: float = 100 * MiB,
    disk_hot_bytes: int = 16 * GiB,
    memory_rate_bps: float = 20 * MiB,
    memory_hot_bytes: int = 128 * MiB,
) -> Workload:
    """Appends to logs: sequential disk writes through a large region, little memory churn."""
    return Workload(
        "log_writer",
        disk_rate_bps,
        disk_hot_bytes,
        Pattern.SEQUENTIAL,
        memory_rate_bps,
        memory_hot_bytes,
        Pattern.RANDOM,
    )


def cache(
    *,
    memory_rate_bps: float = 800 * MiB,
    memory_hot_bytes: int = 4 * GiB,
    disk_rate_bps: float = 1 * MiB,
    disk_hot_bytes: int = 256 * MiB,
) -> Workload:
    """An in-memory cache or a busy JVM heap: memory dirtied at about two thirds of the link, little disk.

    Below the link, so pre-copy converges by itself, slowly; QEMU's auto-converge (which triggers when the
    guest dirties more than half of what was sent) throttles it anyway.
    """
    return Workload("cache", disk_rate_bps, disk_hot_bytes, Pattern.RANDOM, memory_rate_bps, memory_hot_bytes)


def diabolical(
    *,
    link_bps: float = DEFAULT_NIC_BPS,
    link_multiple: float = 100.0,
    memory_hot_bytes: int = 1 << 62,
    disk_rate_bps: float = 200 * MiB,
    disk_hot_bytes: int = 4 * GiB,
) -> Workload:
    """Sweeps all its memory at ``link_multiple`` times the link (the hot set is capped to RAM).

    Like the notes' boot-sector guest that touches one dword per page in a tight loop (48 MiB per ~1 ms
    against a 32 MiB/s link, ~1500x; it did not converge even at QEMU's 99 % throttle): a sequential sweep
    re-dirties ``rate x t`` distinct pages in ``t``, where random writes would keep hitting the same ones.
    At the default 100x the link even a 99 % throttle leaves it dirtying at the link rate.
    """
    return Workload(
        "diabolical",
        disk_rate_bps,
        disk_hot_bytes,
        Pattern.RANDOM,
        link_bps * link_multiple,
        memory_hot_bytes,
        Pattern.SEQUENTIAL,
    )


#: Every workload model by name, each callable with no arguments for its defaults.
WORKLOADS: dict[str, Callable[[], Workload]] = {
    "idle": idle,
    "web": web,
    "database": database,
    "log_writer": log_writer,
    "cache": cache,
    "diabolical": diabolical,
}


class FaultKind(enum.Enum):
    LINK_DROP = "link_drop"  # no byte crosses any more; the controller's stall / no-transfer rules catch it
    TARGET_CRASH = "target_crash"  # the target host dies; the retry should pick another target
    SOURCE_ERROR = "source_error"  # the source's migration job errors out; the source keeps running


@dataclass(frozen=True)
class Fault:
    """Fire ``kind`` once the migration has spent ``after_s`` in ``phase``. A link drop with ``duration_s``
    is a flap: the link comes back after that long (None: it stays down)."""

    kind: FaultKind
    phase: Phase
    after_s: float = 0.0
    duration_s: float | None = None


FAULT_PHASES = (Phase.PREPARING, Phase.DISK, Phase.MEMORY, Phase.SWITCHOVER)


# --- Model state ------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Host:
    name: str
    nic_bps: float = DEFAULT_NIC_BPS
    alive: bool = True
    # droplet id -> image (disk versions, memory versions). A target copy lives here from prepare_target.
    images: dict[str, Image] = field(default_factory=dict)


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

    @property
    def disk_blocks(self) -> int:
        return max(1, math.ceil(self.disk_bytes / self.disk_block_bytes))

    @property
    def memory_pages(self) -> int:
        return max(1, math.ceil(self.memory_bytes / self.memory_page_bytes))


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
    # Rate windows.
    window_start_s: float = 0.0
    window_moved: int = 0
    window_active_s: float = 0.0
    window_disk_dirty: int = 0
    window_memory_dirty: int = 0
    transfer_rate_bps: float = 0.0
    disk_dirty_rate_bps: float = 0.0
    memory_dirty_rate_bps: float = 0.0
    # Exact integrals, for benchmarks: percent x seconds of throttle, seconds under a disk limit.
    throttle_pct_s: float = 0.0
    disk_limit_s: float = 0.0

    @property
    def active(self) -> bool:
        return self.phase in (Phase.DISK, Phase.MEMORY, Phase.SWITCHOVER)


# --- The world --------------------------------------------------------------------------------------------


class SimWorld:
    """A simulated datacenter. Deterministic from ``seed``; time moves only in ``advance``."""

    def __init__(self, seed: int = 0, *, step_s: float = DEFAULT_STEP_S) -> None:
        self.seed = seed
        # Bumped by every save to the store, to detect two processes saving the same world (see save_world).
        self.generation = 0
        self.step_s = step_s
        self.time_s = 0.0
        self.version = 0
        self.rng = random.Random(seed)  # noqa: S311 - a simulation wants reproducible, not secret, numbers
        self.hosts: dict[str, Host] = {}
        self.droplets: dict[str, Droplet] = {}
        self.migrations: dict[str, Migration] = {}
        self.pending_faults: dict[str, list[Fault]] = {}

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
        disk_block_bytes: int = DEFAULT_DISK_BLOCK_BYTES,
        memory_page_bytes: int = DEFAULT_MEMORY_PAGE_BYTES,
    ) -> Droplet:
        if host not in self.hosts:
            raise KeyError(f"no host {host!r}")
        d = Droplet(
            droplet_id,
            host,
            memory_bytes,
            disk_bytes,
            vcpus,
            workload or idle(),
            state,
            disk_block_bytes,
            memory_page_bytes,
        )
        wl = d.workload
        d.disk_hot_start = self.rng.randrange(
            max(1, d.disk_blocks - _blocks(wl.disk_hot_bytes, d, disk=True) + 1)
        )
        d.memory_hot_start = self.rng.randrange(
            max(1, d.memory_pages - _blocks(wl.memory_hot_bytes, d, disk=False) + 1)
        )
        d.disk_cursor = d.disk_hot_start
        d.memory_cursor = d.memory_hot_start
        self.droplets[droplet_id] = d
        # Distinct initial contents: version numbers unique to this droplet.
        disk = array.array("q", (self._bump() for _ in range(d.disk_blocks)))
        memory = array.array("q", (self._bump() for _ in range(d.memory_pages)))
        self.hosts[host].images[droplet_id] = Image(disk, memory)
        return d

    def inject_fault(self, migration_id: str, fault: Fault) -> None:
        """Arm ``fault`` for the migration with this id (before or after it starts)."""
        mig = self.migrations.get(migration_id)
        if mig is not None:
            mig.faults.append(fault)
        else:
            self.pending_faults.setdefault(migration_id, []).append(fault)

    def restart_host(self, name: str) -> None:
        """A crashed host comes back, empty of droplets it did not run."""
        host = self.hosts[name]
        host.alive = True
        running_here = {d.droplet_id for d in self.droplets.values() if d.host == name}
        host.images = {k: v for k, v in host.images.items() if k in running_here}

    # ---- queries -----------------------------------------------------------------------------------------

    def hosts_holding(self, droplet_id: str) -> list[str]:
        """Every host with an image (running copy or leftover) of the droplet."""
        return sorted(h.name for h in self.hosts.values() if droplet_id in h.images)

    def images_equal(self, droplet_id: str, host_a: str, host_b: str) -> bool:
        a = self.hosts[host_a].images.get(droplet_id)
        b = self.hosts[host_b].images.get(droplet_id)
        return a is not None and b is not None and a.disk == b.disk and a.memory == b.memory

    # ---- time --------------------------------------------------------------------------------------------

    def advance(self, seconds: float) -> None:
        """Move simulated time forward by ``seconds`` in steps of ``step_s``."""
        steps = max(1, round(seconds / self.step_s)) if seconds > 0 else 0
        for _ in range(steps):
            self._step(self.step_s)

    def _bump(self) -> int:
        self.version += 1
        return self.version

    def _step(self, dt: float) -> None:
        active = [m for m in self.migrations.values() if m.active]
        for mig in active:
            self._fire_faults(mig)
        active = [m for m in active if m.active]
        for m in active:
            if m.link_back_at_s is not None and self.time_s >= m.link_back_at_s:
                m.link_up, m.link_back_at_s = True, None
        # Fair shares of each host's transmit and receive sides among the migrations that have work.
        senders = [m for m in active if m.link_up and (m.disk_pending or m.memory_pending)]
        tx: dict[str, int] = {}
        rx: dict[str, int] = {}
        for m in senders:
            tx[m.spec.source_host] = tx.get(m.spec.source_host, 0) + 1
            rx[m.spec.target_host] = rx.get(m.spec.target_host, 0) + 1
        for mig in active:
            rate = 0.0
            if mig in senders:
                src, dst = self.hosts[mig.spec.source_host], self.hosts[mig.spec.target_host]
                rate = min(src.nic_bps / tx[src.name], dst.nic_bps / rx[dst.name])
            self._copy(mig, rate, dt)
        # The guest writes after the copy within a step, so what it dirtied in the last step is always still
        # pending: the ~50 ms lag of QEMU's dirty-bitmap sync, which the switchover has to move in the pause.
        for mig in active:
            if mig.active:
                self._write(mig, dt)
            self._account(mig, dt)
        self.time_s += dt

    def _fire_faults(self, mig: Migration) -> None:
        if not self.hosts[mig.spec.target_host].alive:  # crashed under another migration to the same host
            self._fail(mig, f"target host {mig.spec.target_host} is down", target_at_fault=True)
            return
        for fault in list(mig.faults):
            if fault.phase is mig.phase and self.time_s - mig.phase_since_s >= fault.after_s:
                mig.faults.remove(fault)
                self._apply_fault(mig, fault)

    def _apply_fault(self, mig: Migration, fault: Fault) -> None:
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
            self.hosts[mig.spec.target_host].alive = False
            self._fail(mig, f"target host {mig.spec.target_host} crashed", target_at_fault=True)
        else:
            self._fail(
                mig, f"migration job failed on source host {mig.spec.source_host}", target_at_fault=False
            )

    def _fail(self, mig: Migration, error: str, *, target_at_fault: bool) -> None:
        mig.error = error
        mig.target_at_fault = target_at_fault
        self._set_phase(mig, Phase.FAILED)
        droplet = self.droplets[mig.spec.droplet_id]
        if droplet.host == mig.spec.source_host and droplet.state is DomainState.PAUSED:
            droplet.state = DomainState.RUNNING  # pre-copy: the source still has everything; resume it

    def _set_phase(self, mig: Migration, phase: Phase) -> None:
        mig.phase = phase
        mig.phase_since_s = self.time_s

    def _write(self, mig: Migration, dt: float) -> None:
        d = self.droplets[mig.spec.droplet_id]
        if d.state is not DomainState.RUNNING or d.host != mig.spec.source_host:
            return
        image = self.hosts[d.host].images[d.droplet_id]
        wl = d.workload
        slow = 1.0 - d.throttle_pct / 100.0
        disk_rate = wl.disk_rate_bps * slow
        if d.disk_limit_bps is not None:
            disk_rate = min(disk_rate, float(d.disk_limit_bps))
        n_disk, d.disk_carry = _whole(disk_rate * dt / d.disk_block_bytes + d.disk_carry)
        n_mem, d.memory_carry = _whole(wl.memory_rate_bps * slow * dt / d.memory_page_bytes + d.memory_carry)
        d.disk_cursor = self._dirty(
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
        d.memory_cursor = self._dirty(
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

    def _dirty(
        self,
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
            versions[start : start + hot] = array.array("q", range(self.version + 1, self.version + hot + 1))
            self.version += hot
            pending.update(range(start, start + hot))
            return start + (cursor - start + n) % hot
        for _ in range(n):
            if pattern is Pattern.SEQUENTIAL:
                i = cursor
                cursor = start + (i - start + 1) % hot
            else:
                i = start + self.rng.randrange(hot)
            versions[i] = self._bump()
            pending.add(i)
        return cursor

    def _copy(self, mig: Migration, rate_bps: float, dt: float) -> None:
        d = self.droplets[mig.spec.droplet_id]
        src = self.hosts[mig.spec.source_host].images[d.droplet_id]
        dst_host = self.hosts[mig.spec.target_host]
        dst = dst_host.images.get(d.droplet_id)
        if dst is None:
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
        if mig.disk_pass and mig.disk_pos >= len(mig.disk_pass):
            mig.disk_first_pass_done = True
        if mig.phase is Phase.DISK and mig.disk_first_pass_done:
            ready = len(mig.disk_pending) * d.disk_block_bytes <= max(rate_bps, 1.0) * DISK_READY_S
            if ready:
                self._set_phase(mig, Phase.MEMORY)
                mig.memory_pass = [] if mig.spec.offline else list(range(d.memory_pages))
                mig.memory_pos = 0
                mig.round = 0 if mig.spec.offline else 1
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

    def _commit(self, mig: Migration, end_s: float) -> None:
        """The switchover's last step: verify every version, then move the droplet in one step."""
        spec = mig.spec
        d = self.droplets[spec.droplet_id]
        if spec.offline:  # a shut-off droplet has no memory to carry: its disk is all there is
            src = self.hosts[spec.source_host].images[spec.droplet_id]
            dst = self.hosts[spec.target_host].images[spec.droplet_id]
            mig.verified = src.disk == dst.disk
        else:
            mig.verified = self.images_equal(spec.droplet_id, spec.source_host, spec.target_host)
        if not mig.verified:
            self._fail(
                mig, "verification failed: target differs from source at switchover", target_at_fault=False
            )
            return
        started_s = mig.switchover_at_s if mig.switchover_at_s is not None else end_s
        mig.downtime_ms = (end_s - started_s) * 1000.0 + SWITCHOVER_OVERHEAD_MS
        d.host = spec.target_host
        # The target's QEMU starts with neither the temporary disk limit nor the throttle.
        d.throttle_pct = 0
        d.disk_limit_bps = None
        if spec.offline:
            d.state = DomainState.RUNNING if spec.power_on_after else DomainState.SHUT_OFF
        else:
            d.state = DomainState.RUNNING
        self._set_phase(mig, Phase.DONE)

    def _account(self, mig: Migration, dt: float) -> None:
        d = self.droplets[mig.spec.droplet_id]
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
            mig.memory_dirty_rate_bps = mig.window_memory_dirty / span
            mig.window_start_s = self.time_s + dt
            mig.window_moved = mig.window_disk_dirty = mig.window_memory_dirty = 0
            mig.window_active_s = 0.0

    # ---- serialisation -----------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The whole world as plain JSON values (what ``Store.sim_put`` keeps)."""
        rng_version, rng_internal, rng_gauss = self.rng.getstate()
        return {
            "format": 1,
            "generation": self.generation,
            "seed": self.seed,
            "step_s": self.step_s,
            "time_s": self.time_s,
            "version": self.version,
            "rng": [rng_version, list(rng_internal), rng_gauss],
            "hosts": [
                {
                    "name": h.name,
                    "nic_bps": h.nic_bps,
                    "alive": h.alive,
                    "images": {
                        k: {"disk": _pack(v.disk), "memory": _pack(v.memory)} for k, v in h.images.items()
                    },
                }
                for h in self.hosts.values()
            ],
            "droplets": [_droplet_to_dict(d) for d in self.droplets.values()],
            "migrations": [_migration_to_dict(m) for m in self.migrations.values()],
            "pending_faults": {k: [_fault_to_dict(f) for f in v] for k, v in self.pending_faults.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SimWorld:
        if data.get("format") != 1:
            raise ValueError(f"unknown sim world format {data.get('format')!r}")
        world = cls(data["seed"], step_s=data["step_s"])
        world.time_s = data["time_s"]
        world.version = data["version"]
        world.generation = data.get("generation", 0)
        v, internal, gauss = data["rng"]
        world.rng.setstate((v, tuple(internal), gauss))
        for h in data["hosts"]:
            host = Host(h["name"], h["nic_bps"], h["alive"])
            host.images = {
                k: Image(_unpack(img["disk"]), _unpack(img["memory"])) for k, img in h["images"].items()
            }
            world.hosts[host.name] = host
        for d in data["droplets"]:
            world.droplets[d["droplet_id"]] = _droplet_from_dict(d)
        for m in data["migrations"]:
            mig = _migration_from_dict(m)
            world.migrations[mig.spec.migration_id] = mig
        world.pending_faults = {
            k: [_fault_from_dict(f) for f in v] for k, v in data["pending_faults"].items()
        }
        return world

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SimWorld:
        return cls.from_dict(json.loads(text))


def _whole(x: float) -> tuple[int, float]:
    n = math.floor(x)
    return n, x - n


def _blocks(hot_bytes: int, d: Droplet, *, disk: bool) -> int:
    size, count = (d.disk_block_bytes, d.disk_blocks) if disk else (d.memory_page_bytes, d.memory_pages)
    return max(1, min(count, math.ceil(hot_bytes / size)))


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


def _pack(values: array.array[int]) -> str:
    return base64.b64encode(zlib.compress(values.tobytes())).decode("ascii")


def _unpack(text: str) -> array.array[int]:
    values = array.array("q")
    values.frombytes(zlib.decompress(base64.b64decode(text)))
    return values


def _fault_to_dict(f: Fault) -> dict[str, Any]:
    return {"kind": f.kind.value, "phase": f.phase.value, "after_s": f.after_s, "duration_s": f.duration_s}


def _fault_from_dict(d: dict[str, Any]) -> Fault:
    return Fault(FaultKind(d["kind"]), Phase(d["phase"]), d["after_s"], d.get("duration_s"))


def _droplet_to_dict(d: Droplet) -> dict[str, Any]:
    out = {k: v for k, v in vars(d).items() if k not in ("workload", "state")}
    out["workload"] = d.workload.to_dict()
    out["state"] = d.state.value
    return out


def _droplet_from_dict(data: dict[str, Any]) -> Droplet:
    return Droplet(
        **{
            **data,
            "workload": Workload.from_dict(data["workload"]),
            "state": DomainState(data["state"]),
        }
    )


_SET_FIELDS = ("disk_pending", "memory_pending")


def _migration_to_dict(m: Migration) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in vars(m).items():
        if k == "spec":
            out[k] = asdict(v)
        elif k == "phase":
            out[k] = v.value
        elif k == "faults":
            out[k] = [_fault_to_dict(f) for f in v]
        elif k in _SET_FIELDS:
            out[k] = sorted(v)
        else:
            out[k] = v
    return out


def _migration_from_dict(data: dict[str, Any]) -> Migration:
    values = dict(data)
    values["spec"] = MigrationSpec(**data["spec"])
    values["phase"] = Phase(data["phase"])
    values["faults"] = [_fault_from_dict(f) for f in data["faults"]]
    for k in _SET_FIELDS:
        values[k] = set(data[k])
    return Migration(**values)


# --- Keeping the world where several processes see it (DESIGN.md §9) -------------------------------------

WORLD_KEY = "world"


class WorldConflict(Exception):
    """Another process saved the world since this copy was loaded: reload instead of overwriting its work."""


class SimKV(Protocol):
    """The store's key/value table for the simulator (``host_engine.store.Tx`` has these)."""

    def sim_get(self, key: str, *, for_update: bool = False) -> Any | None: ...

    def sim_put(self, key: str, value: Any) -> None: ...


class SimKVStore(Protocol):
    """Something that opens transactions over a ``SimKV`` (``host_engine.store.Store``)."""

    def begin(self) -> AbstractContextManager[SimKV]: ...


def load_world(store: SimKVStore, key: str = WORLD_KEY) -> SimWorld | None:
    """The world saved under ``key``, or None if there is none yet."""
    with store.begin() as tx:
        data = tx.sim_get(key)
    return None if data is None else SimWorld.from_dict(data)


def save_world(store: SimKVStore, world: SimWorld, key: str = WORLD_KEY) -> None:
    """Save ``world`` in one transaction, refusing (``WorldConflict``) if another process saved it meanwhile.

    The generation check runs under the row lock (``FOR UPDATE`` on PostgreSQL, the single writer on SQLite),
    so of two processes that loaded the same generation only the first save wins.
    """
    new_generation = world.generation + 1
    with store.begin() as tx:
        current = tx.sim_get(key, for_update=True)
        stored = 0 if current is None else int(current.get("generation", 0))
        if current is not None and stored != world.generation:
            raise WorldConflict(
                f"sim world {key!r} is at generation {stored}, this copy at {world.generation}"
            )
        data = world.to_dict()
        data["generation"] = new_generation
        tx.sim_put(key, data)
    world.generation = new_generation


# --- The driver -------------------------------------------------------------------------------------------


class SimClock:
    """The clock of a simulated world: ``sleep`` advances the world instead of waiting."""

    def __init__(self, world: SimWorld) -> None:
        self.world = world

    def now(self) -> float:
        return self.world.time_s

    def sleep(self, seconds: float) -> None:
        self.world.advance(seconds)


class SimHypervisor:
    """``HypervisorDriver`` over a ``SimWorld``."""

    def __init__(self, world: SimWorld) -> None:
        self.world = world

    def migration(self, spec: MigrationSpec) -> SimMigrationDriver:
        return SimMigrationDriver(self.world, spec)

    def domain_state(self, host: str, droplet_id: str) -> DomainState:
        d = self.world.droplets.get(droplet_id)
        if d is None or d.host != host:
            return DomainState.ABSENT
        return d.state

    def recover(self, spec: MigrationSpec) -> str:
        world = self.world
        mig = world.migrations.get(spec.migration_id)
        d = world.droplets[spec.droplet_id]
        if (mig is not None and mig.phase is Phase.DONE) or d.host == spec.target_host:
            world.hosts[spec.source_host].images.pop(spec.droplet_id, None)
            if mig is not None:
                mig.finalized = True
            return spec.target_host
        driver = SimMigrationDriver(world, spec)
        driver.abort()
        if (
            mig is not None
        ):  # never prepared here (e.g. the worker died before prepare_target): nothing to finalize
            driver.finalize(False)
        return spec.source_host


class SimMigrationDriver:
    """``MigrationDriver`` for one migration in a ``SimWorld``."""

    def __init__(self, world: SimWorld, spec: MigrationSpec) -> None:
        self.world = world
        self.spec = spec

    @property
    def _mig(self) -> Migration:
        mig = self.world.migrations.get(self.spec.migration_id)
        if mig is None:
            raise DriverError(f"migration {self.spec.migration_id} was not prepared")
        return mig

    @property
    def _droplet(self) -> Droplet:
        return self.world.droplets[self.spec.droplet_id]

    def prepare_target(self) -> None:
        world, spec = self.world, self.spec
        d = world.droplets.get(spec.droplet_id)
        if d is None or d.host != spec.source_host:
            raise DriverError(f"droplet {spec.droplet_id} is not on {spec.source_host}")
        target = world.hosts.get(spec.target_host)
        if target is None or not target.alive:
            raise DriverError(f"target host {spec.target_host} is unreachable", target_at_fault=True)
        mig = world.migrations.get(spec.migration_id)
        if mig is not None and not mig.finalized and mig.phase is not Phase.PREPARING:
            raise DriverError(f"migration {spec.migration_id} is already under way ({mig.phase.value})")
        if mig is None or mig.finalized:
            mig = Migration(spec, started_at_s=world.time_s, phase_since_s=world.time_s)
            mig.faults = world.pending_faults.pop(spec.migration_id, [])
            world.migrations[spec.migration_id] = mig
        for fault in list(mig.faults):
            if fault.phase is Phase.PREPARING:
                mig.faults.remove(fault)
                world._apply_fault(mig, fault)
                if fault.kind is FaultKind.LINK_DROP:
                    mig.error = "link to target down"
                    world._set_phase(mig, Phase.FAILED)
                raise DriverError(mig.error or "prepare failed", target_at_fault=mig.target_at_fault)
        blank = Image(array.array("q", bytes(8 * d.disk_blocks)), array.array("q", bytes(8 * d.memory_pages)))
        target.images[spec.droplet_id] = blank

    def start(self) -> None:
        mig, d = self._mig, self._droplet
        if mig.phase is not Phase.PREPARING:
            raise DriverError(f"cannot start a migration in phase {mig.phase.value}")
        offline = self.spec.offline or d.state is DomainState.SHUT_OFF
        if offline and not self.spec.offline:
            raise DriverError(f"droplet {d.droplet_id} is shut off: needs an offline migration")
        mig.disk_pending = set(range(d.disk_blocks))
        mig.disk_pass = list(range(d.disk_blocks))
        mig.memory_pending = set() if offline else set(range(d.memory_pages))
        mig.started_at_s = self.world.time_s
        mig.window_start_s = self.world.time_s
        self.world._set_phase(mig, Phase.DISK)

    def progress(self) -> Progress:
        mig, d = self._mig, self._droplet
        offline = self.spec.offline
        disk_total = d.disk_blocks * d.disk_block_bytes
        memory_total = 0 if offline else d.memory_pages * d.memory_page_bytes
        # Before start() nothing is pending yet: everything is still to copy.
        started = mig.phase is not Phase.PREPARING
        disk_left = len(mig.disk_pending) * d.disk_block_bytes if started else disk_total
        memory_left = len(mig.memory_pending) * d.memory_page_bytes if started else memory_total
        on_source = d.host == self.spec.source_host
        return Progress(
            phase=mig.phase,
            elapsed_s=self.world.time_s - mig.started_at_s,
            round=mig.round,
            disk_total_bytes=disk_total,
            disk_processed_bytes=mig.disk_sent_bytes,
            disk_remaining_bytes=disk_left,
            memory_total_bytes=memory_total,
            memory_processed_bytes=mig.memory_sent_bytes,
            memory_remaining_bytes=memory_left,
            disk_dirty_rate_bps=mig.disk_dirty_rate_bps,
            memory_dirty_rate_bps=mig.memory_dirty_rate_bps,
            transfer_rate_bps=mig.transfer_rate_bps if mig.link_up else 0.0,
            disk_write_limit_bps=d.disk_limit_bps if on_source else None,
            memory_throttle_pct=d.throttle_pct if on_source else 0,
            max_downtime_ms=mig.max_downtime_ms,
            downtime_ms=mig.downtime_ms,
            bytes_transferred=mig.disk_sent_bytes + mig.memory_sent_bytes,
            error=mig.error,
            target_at_fault=mig.target_at_fault,
        )

    def _on_source(self) -> Droplet | None:
        d = self._droplet
        return d if d.host == self.spec.source_host else None

    def set_disk_write_limit(self, bytes_per_s: int | None) -> None:
        d = self._on_source()
        if d is not None:  # after switchover the source QEMU is gone and the target never had a limit
            d.disk_limit_bps = bytes_per_s

    def set_memory_throttle(self, percent: int) -> None:
        if not 0 <= percent <= 99:
            raise ValueError(f"throttle percent {percent} outside 0..99")
        d = self._on_source()
        if d is not None:
            d.throttle_pct = percent

    def set_max_downtime(self, ms: int) -> None:
        self._mig.max_downtime_ms = ms

    def switchover(self) -> None:
        mig, d = self._mig, self._droplet
        if mig.phase not in (Phase.DISK, Phase.MEMORY):
            raise DriverError(f"cannot switch over in phase {mig.phase.value}")
        if d.state is DomainState.RUNNING:
            d.state = DomainState.PAUSED
        mig.switchover_at_s = self.world.time_s
        mig.credit_bytes = (
            0.0  # the pause lasts as long as the remainder takes at the link rate, no banked credit
        )
        # A memory pass in progress continues; pages not yet sent are pending anyway.
        # The remainder moves (and the droplet moves) in the world's next step; faults may strike first.
        self.world._set_phase(mig, Phase.SWITCHOVER)

    def abort(self) -> None:
        mig = self.world.migrations.get(self.spec.migration_id)
        d = self._droplet
        if mig is not None and mig.phase is Phase.DONE:
            raise DriverError(f"migration {self.spec.migration_id} already switched over; cannot abort")
        if mig is not None and mig.phase is not Phase.FAILED:
            mig.error = mig.error or "aborted"
            self.world._set_phase(mig, Phase.FAILED)
        if d.host == self.spec.source_host:
            if d.state is DomainState.PAUSED:
                d.state = DomainState.RUNNING
            d.throttle_pct = 0
            d.disk_limit_bps = None
        if d.host != self.spec.target_host:
            self.world.hosts[self.spec.target_host].images.pop(self.spec.droplet_id, None)

    def finalize(self, success: bool) -> None:
        mig, d, world = self._mig, self._droplet, self.world
        if success:
            if mig.phase is not Phase.DONE:
                raise DriverError(f"finalize(success) in phase {mig.phase.value}")
            world.hosts[self.spec.source_host].images.pop(d.droplet_id, None)
        elif d.host != self.spec.target_host:
            world.hosts[self.spec.target_host].images.pop(d.droplet_id, None)
        mig.finalized = True

    # ---- for tests and benchmarks ------------------------------------------------------------------------

    @property
    def verified(self) -> bool | None:
        """Whether target equalled source, every block and page, at switchover (None: never got there)."""
        return self._mig.verified

    @property
    def throttle_pct_s(self) -> float:
        return self._mig.throttle_pct_s

    @property
    def disk_limit_s(self) -> float:
        return self._mig.disk_limit_s
