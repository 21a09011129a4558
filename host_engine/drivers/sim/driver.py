"""The sim driver proper: ``HypervisorDriver`` / ``MigrationDriver`` over a ``SimWorld``.

It works the same over an in-memory ``SimWorld`` and over a ``StoredWorld`` (rows in the engine's store):
every state it reads or changes goes through the world's accessors, and the calls after which the executor
records an outcome in the store (``finalize``, ``recover``) first make the world durable (``persist``).
"""

from __future__ import annotations

from host_engine.drivers.base import DomainState, DriverError, MigrationSpec, Phase, Progress
from host_engine.drivers.memory_left import MemoryLeftBound
from host_engine.drivers.sim.faults import FaultKind
from host_engine.drivers.sim.model import (
    RATE_WINDOW_S,
    Droplet,
    Migration,
    SimWorld,
    blank_image,
    holds_data,
    reported_pages,
)
from host_engine.drivers.sim.workloads import MiB

# Options a spec may carry that the sim reads (the libvirt driver reads the same names).
BANDWIDTH_OPTION = "bandwidth_mibps"
MAX_BANDWIDTH_MIBPS = 1 << 20
SYNC_WRITES_OPTION = "sync_writes"


def sync_writes(spec: MigrationSpec, default: bool) -> bool:
    """Whether the migration's disk mirror is write-blocking: ``options["sync_writes"]`` (``1`` or ``0``, as
    the libvirt driver takes it), else ``default`` (the source host's ``HostModel.sync_disk_writes``)."""
    raw = spec.options.get(SYNC_WRITES_OPTION)
    if raw is None:
        return default
    if raw not in ("0", "1"):
        raise DriverError(f"options.{SYNC_WRITES_OPTION} must be 0 or 1, not {raw!r}")
    return raw == "1"


def bandwidth_cap_bps(spec: MigrationSpec) -> float | None:
    """The migration's bandwidth cap from ``options["bandwidth_mibps"]`` (whole MiB/s, as libvirt takes
    it); None or 0: no cap (the link's speed). A value that is not a whole number in range is a
    ``DriverError``, one line, as the libvirt driver says it."""
    raw = spec.options.get(BANDWIDTH_OPTION)
    if raw is None or str(raw).strip() == "":
        return None
    try:
        mibps = int(str(raw).strip())
    except ValueError as e:
        raise DriverError(f"options.{BANDWIDTH_OPTION} must be a whole number, not {raw!r}") from e
    if not 0 <= mibps <= MAX_BANDWIDTH_MIBPS:
        raise DriverError(f"options.{BANDWIDTH_OPTION} must be within 0..{MAX_BANDWIDTH_MIBPS}, not {mibps}")
    return float(mibps * MiB) if mibps else None


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
        d = self.world.find_droplet(droplet_id)
        if d is None or d.host != host:
            return DomainState.ABSENT
        return d.state

    def recover(self, spec: MigrationSpec) -> str:
        world = self.world
        mig = world.migration(spec.migration_id)
        d = world.find_droplet(spec.droplet_id)
        if d is None:
            raise DriverError(f"droplet {spec.droplet_id} is unknown to the simulator")
        if (mig is not None and mig.phase is Phase.DONE) or d.host == spec.target_host:
            world.drop_image(spec.droplet_id, spec.source_host)
            if mig is not None:
                mig.finalized = True
            world.persist()
            return spec.target_host
        driver = SimMigrationDriver(world, spec)
        driver.abort()
        if mig is not None:  # never prepared here (e.g. the worker died before prepare_target): nothing more
            driver.finalize(False)
        world.persist()
        return spec.source_host


class SimMigrationDriver:
    """``MigrationDriver`` for one migration in a ``SimWorld``."""

    def __init__(self, world: SimWorld, spec: MigrationSpec) -> None:
        self.world = world
        self.spec = spec

    @property
    def _mig(self) -> Migration:
        mig = self.world.migration(self.spec.migration_id)
        if mig is None:
            raise DriverError(f"migration {self.spec.migration_id} was not prepared")
        return mig

    @property
    def _droplet(self) -> Droplet:
        d = self.world.find_droplet(self.spec.droplet_id)
        if d is None:
            raise DriverError(f"droplet {self.spec.droplet_id} is unknown to the simulator")
        return d

    def prepare_target(self) -> None:
        world, spec = self.world, self.spec
        d = world.find_droplet(spec.droplet_id)
        if d is None or d.host != spec.source_host:
            raise DriverError(f"droplet {spec.droplet_id} is not on {spec.source_host}")
        target = world.find_host(spec.target_host)
        if target is None or not target.alive:
            raise DriverError(f"target host {spec.target_host} is unreachable", target_at_fault=True)
        mig = world.migration(spec.migration_id)
        if mig is not None and not mig.finalized and mig.phase is not Phase.PREPARING:
            raise DriverError(f"migration {spec.migration_id} is already under way ({mig.phase.value})")
        if mig is None or mig.finalized:
            mig = Migration(spec, started_at_s=world.time_s, phase_since_s=world.time_s)
            mig.faults = world.take_pending_faults(spec.migration_id)
            world.add_migration(mig)
        for fault in list(mig.faults):
            if fault.phase is Phase.PREPARING:
                mig.faults.remove(fault)
                world.apply_fault(mig, fault)
                if fault.kind is FaultKind.LINK_DROP:
                    mig.error = "link to target down"
                    world.set_phase(mig, Phase.FAILED)
                raise DriverError(mig.error or "prepare failed", target_at_fault=mig.target_at_fault)
        world.put_image(spec.droplet_id, spec.target_host, blank_image(d))

    def start(self) -> None:
        mig, d = self._mig, self._droplet
        if mig.phase is not Phase.PREPARING:
            raise DriverError(f"cannot start a migration in phase {mig.phase.value}")
        offline = self.spec.offline or d.state is DomainState.SHUT_OFF
        if offline and not self.spec.offline:
            raise DriverError(f"droplet {d.droplet_id} is shut off: needs an offline migration")
        src = self.world.image(d.droplet_id, self.spec.source_host)
        dst = self.world.image(d.droplet_id, self.spec.target_host)
        if src is None or dst is None:
            raise DriverError(f"migration {self.spec.migration_id} has no images to copy")
        disk, memory = holds_data(d, src)
        # Zero pages and unallocated blocks are the same on both sides from the start: nothing to send.
        for i in range(d.disk_blocks):
            if i not in disk:
                dst.disk[i] = src.disk[i]
        for i in range(d.memory_pages):
            if i not in memory:
                dst.memory[i] = src.memory[i]
        mig.disk_pending = disk
        mig.disk_pass = sorted(disk)
        mig.memory_pending = set() if offline else memory
        mig.cap_bps = bandwidth_cap_bps(self.spec)
        # The mirror runs in the source's QEMU; a shut-off droplet writes nothing.
        source_model = self.world.host_model(self.spec.source_host)
        mig.sync_writes = sync_writes(self.spec, source_model.sync_disk_writes) and not offline
        mig.mirror_bps = source_model.mirror_bps
        hm = self.world.host_model(self.spec.target_host)
        mig.copy_from_s = self.world.time_s + hm.setup_s
        mig.switchover_ms = hm.switchover_ms
        mig.started_at_s = self.world.time_s
        mig.window_start_s = self.world.time_s
        self.world.set_phase(mig, Phase.DISK)

    def progress(self) -> Progress:
        mig, d = self._mig, self._droplet
        offline = self.spec.offline
        disk_total = d.disk_blocks * d.disk_block_bytes
        memory_total = 0 if offline else d.memory_pages * d.memory_page_bytes
        # Before start() nothing is pending yet: everything is still to copy.
        started = mig.phase is not Phase.PREPARING
        disk_left = len(mig.disk_pending) * d.disk_block_bytes if started else disk_total
        memory_left = self._memory_left(mig, d) if started and mig.phase is not Phase.DISK else memory_total
        on_source = d.host == self.spec.source_host
        # A completed job's elapsed time is when it ended (as libvirt's completed stats say), not when read.
        now_s = mig.phase_since_s if mig.phase is Phase.DONE else self.world.time_s
        return Progress(
            phase=mig.phase,
            elapsed_s=now_s - mig.started_at_s,
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
            downtime_ms=mig.downtime_ms,
            bytes_transferred=mig.disk_sent_bytes + mig.memory_sent_bytes,
            error=mig.error,
            target_at_fault=mig.target_at_fault,
            rate_window_s=RATE_WINDOW_S,
        )

    @staticmethod
    def _memory_left(mig: Migration, d: Droplet) -> int:
        """The RAM left once memory began, as the libvirt driver reports it (before, all of it): during
        pre-copy QEMU's remainder (``reported_pages``) bounded as the libvirt driver bounds it
        (``MemoryLeftBound``: at least the first reading of this round and the last); in the pause,
        everything not sent."""
        if mig.spec.offline or mig.phase is not Phase.MEMORY:
            return len(mig.memory_pending) * d.memory_page_bytes
        bound = MemoryLeftBound(mig.left_round_seen, list(mig.left_round_starts))
        left = bound.update(mig.round, reported_pages(mig, d) * d.memory_page_bytes)
        mig.left_round_seen, mig.left_round_starts = bound.round_seen, bound.round_starts
        return left

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
        if d is None:
            return
        # At once: real auto-converge applies a raised level at its second dirty sync after the request
        # (measured: asked in round 2, in force from round 4), which the sim does not model yet.
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
        # The pause lasts as long as the remainder takes at the link rate: no banked credit.
        mig.credit_bytes = 0.0
        # A memory pass in progress continues; pages not yet sent are pending anyway.
        # The remainder moves (and the droplet moves) in the world's next step; faults may strike first.
        self.world.set_phase(mig, Phase.SWITCHOVER)

    def abort(self) -> None:
        mig = self.world.migration(self.spec.migration_id)
        if mig is not None and mig.finalized:
            return  # already cleaned up (by this worker, or by another one's recovery): nothing is ours now
        d = self._droplet
        if mig is not None and mig.phase is Phase.DONE:
            raise DriverError(f"migration {self.spec.migration_id} already switched over; cannot abort")
        if mig is not None and mig.phase is not Phase.FAILED:
            mig.error = mig.error or "aborted"
            self.world.set_phase(mig, Phase.FAILED)
        if d.host == self.spec.source_host:
            if d.state is DomainState.PAUSED:
                d.state = DomainState.RUNNING
            d.throttle_pct = 0
            d.disk_limit_bps = None
        if d.host != self.spec.target_host:
            self.world.drop_image(self.spec.droplet_id, self.spec.target_host)

    def finalize(self, success: bool) -> None:
        mig, d, world = self._mig, self._droplet, self.world
        if success:
            if mig.phase is not Phase.DONE:
                raise DriverError(f"finalize(success) in phase {mig.phase.value}")
            world.drop_image(d.droplet_id, self.spec.source_host)
        elif d.host != self.spec.target_host:
            world.drop_image(d.droplet_id, self.spec.target_host)
        mig.finalized = True
        # The executor records the outcome in the store next: the world must already say the same.
        world.persist()

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
