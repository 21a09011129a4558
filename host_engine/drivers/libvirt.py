"""The libvirt driver: inventory from, and live migration between, real hypervisors (DESIGN.md §7).

The only module of the engine that imports ``libvirt`` / ``libvirt_qemu``, and only when a function here is
called, so the rest of the engine (and its tests) runs without libvirt-python installed.

How a migration runs (one :class:`LibvirtMigration` per attempt, driven through ``MigrationDriver``):

``prepare_target``
    reads the source domain's disks, refuses if the target already uses those paths for another domain,
    removes what an earlier failed attempt left on the target (a domain that never became the live copy,
    its disks), then creates each disk on the target **through libvirt's storage API** (a ``dir`` pool over
    the disk's directory, a volume of the source's format and capacity). Why the storage API and not
    ``qemu-img`` run on the target: the engine reaches a hypervisor only through its libvirt URI (TLS or
    SSH in production), so anything that needs a shell on the target would be a second, unaudited channel;
    libvirt runs ``qemu-img`` itself, with the daemon's own permissions and paths.
``start``
    calls ``migrateToURI3`` in a thread, peer-to-peer (the source libvirtd talks to the target itself, so
    the engine's connection is not in the data path), with ``LIVE | PEER2PEER | NON_SHARED_DISK |
    PERSIST_DEST | UNDEFINE_SOURCE | AUTO_CONVERGE``: QEMU mirrors each disk to an NBD export on the target
    (with a dirty bitmap), then pre-copies memory while the mirror keeps the disks in sync. The bandwidth
    cap (``options["bandwidth_mibps"]``) is a migration parameter, so it holds from the first byte.
``progress``
    is built from ``jobStats()`` (plus the guest's disk write rate, from ``blockStats`` deltas) and the
    domain events (switchover, job completed with its downtime).
``set_disk_write_limit``
    QEMU's ``block_set_io_throttle`` sent as a QMP command through ``libvirt_qemu.qemuMonitorCommand`` to the
    *running source*. libvirt's own ``setBlockIoTune`` cannot be used: on libvirt 9.0 it waits for the
    domain's job lock, which the migration job holds, and fails after 30 s. The QMP limit lives only in the
    source QEMU: libvirt does not know it (the domain gets tainted "custom-monitor"), so it is not in the XML
    sent to the target and the target starts with only the disk's own ``<iotune>`` limits. The driver lifts
    it (back to the disk's own limits) on abort and failure, so the source is left as it was.
``set_memory_throttle``
    QEMU's auto-converge CPU throttle, steered: the capability is enabled at start but disarmed
    (``max-cpu-throttle`` 1 %, trigger threshold 100 %); a request for N % sets QMP
    ``migrate-set-parameters`` ``cpu-throttle-initial`` / ``max-cpu-throttle`` to N and the trigger threshold
    to 1 %, so QEMU throttles at exactly N % from its next dirty-sync on. QEMU has no other way to throttle
    vCPUs during a migration, and the capability cannot be switched on once a migration runs; the
    controller, not QEMU, picks the level. ``options["auto_converge"]="qemu"`` leaves QEMU's own policy
    instead (for comparisons), ``"off"`` disables it.
``switchover``
    pauses the source (``suspend``, what ``virsh migrate --timeout-suspend`` does): QEMU then moves the
    remainder and libvirt resumes the guest on the target. QEMU also switches over by itself when the
    remainder fits ``migrateSetMaxDowntime``.
``abort`` / ``finalize(False)``
    ``abortJob``, wait for the migration thread, lift the throttle, check the source runs (resume it if the
    migration left it paused), then remove the target's domain and the volumes this attempt created. When
    the target cannot be reached the source is still checked and :class:`DriverError` says the target is at
    fault; the next attempt's ``prepare_target`` (or :meth:`LibvirtHypervisor.recover`) removes the leftovers.
``finalize(True)``
    checks the target holds the domain (defined; running unless asked otherwise), that the source holds
    none, and deletes the source's copies of the migrated disks (``options["keep_source_disks"]="1"`` keeps
    them).

Offline migration (``spec.offline``, the domain is shut off). libvirt refuses ``VIR_MIGRATE_OFFLINE`` with
``NON_SHARED_DISK``. Two ways stay inside libvirt; this driver starts the domain paused
(``VIR_DOMAIN_START_PAUSED``: the guest never executes an instruction), live-migrates it with ``PAUSED``
and then, on the target, resumes it (a fresh boot) when ``spec.power_on_after`` or destroys it (it stays
defined, shut off). Why not storage-volume streams (``virStorageVol.download`` → ``upload``): the
streams carry every byte through the engine's own connection (source → engine → target, two hops over
whatever link the engine has), and the domain must then be defined by hand; the paused migration copies
host to host over the migration network with the same code path, progress, bandwidth cap and abort as a
live one. Measured on the build machine (docs/libvirt.md), where the engine sits on the hosts' own
machine so its two hops cost nothing: streams 0.19 s / 2.6 s for 32 / 256 MiB of data, the paused
migration 9.1 s / 11.0 s, almost all of it the fixed cost of starting QEMU on both hosts (2.3-5.4 s once the
hosts are warm). The fixed cost is paid once per droplet; the engine's link would be paid per byte, for
every offline migration of the fleet at once.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import logging
import posixpath
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from host_engine.drivers.base import (
    AlreadyCompleted,
    DomainState,
    DriverError,
    MigrationDriver,
    MigrationSpec,
    Phase,
    Progress,
    Recovered,
)

log = logging.getLogger(__name__)

# How long abort() waits for the migration thread after abortJob (QEMU cancels within a second or two).
ABORT_WAIT_S = 60.0
# A target that could not be cleaned (its daemon down) is tried again this often, for up to a day.
LEFTOVER_RETRY_S = 2.0
LEFTOVER_GIVE_UP_S = 86400.0
# recover(): how long to wait for an orphaned job to end after abortJob.
RECOVER_JOB_WAIT_S = 60.0
RECOVER_POLL_S = 0.2
# A control call that failed is ignored if the migration job ends within this long (it raced the end).
END_RACE_WAIT_S = 2.0
# finalize(True) waits this long for the migration thread to return (the job completed event comes first).
FINALIZE_WAIT_S = 120.0
# A disk write limit is a QMP command; QEMU answers in milliseconds even under load.
QMP_FLAGS = 0
# Disarmed auto-converge: QEMU may throttle at most 1 %, and only when the guest dirties more than it sends.
DISARMED_THROTTLE_PCT = 1
QEMU_MAX_THROTTLE_PCT = 99
DISARMED_TRIGGER_PCT = 100
ARMED_TRIGGER_PCT = 1
# Pools this driver creates on a host to manage volumes in a directory: transient, named after the directory.
POOL_PREFIX = "dlm-"
DEFAULT_PAGE_SIZE = 4096
# Rates are averaged over this window (see LibvirtMigration._rates); samples closer than the gap are merged.
RATE_WINDOW_S = 8.0
MIN_SAMPLE_GAP_S = 0.05
# libvirt iotune element → QMP block_set_io_throttle argument.
IOTUNE_TO_QMP = {
    "total_bytes_sec": "bps",
    "read_bytes_sec": "bps_rd",
    "write_bytes_sec": "bps_wr",
    "total_iops_sec": "iops",
    "read_iops_sec": "iops_rd",
    "write_iops_sec": "iops_wr",
}


def _libvirt() -> Any:
    try:
        import libvirt
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise DriverError(
            "libvirt-python is not installed (pip install 'droplet-live-migration[libvirt]')"
        ) from e
    return libvirt


def _libvirt_qemu() -> Any:
    try:
        import libvirt_qemu
    except ImportError as e:  # pragma: no cover
        raise DriverError(
            "libvirt-python is not installed (pip install 'droplet-live-migration[libvirt]')"
        ) from e
    return libvirt_qemu


def _open(uri: str) -> Any:
    lv = _libvirt()
    _quiet(lv)
    try:
        return lv.open(uri)
    except lv.libvirtError as e:
        raise DriverError(f"cannot connect to {uri}: {e}") from e


def _quiet(lv: Any) -> None:
    # libvirt prints every error to stderr by default; ours are raised as exceptions instead.
    lv.registerErrorHandler(lambda _ctx, _err: None, None)


@contextlib.contextmanager
def _errors(what: str, *, target_at_fault: bool = False) -> Iterator[None]:
    """libvirt's exceptions as ``DriverError`` (what the executor handles), with what was being done."""
    lv = _libvirt()
    try:
        yield
    except lv.libvirtError as e:
        raise DriverError(f"{what}: {e}", target_at_fault=target_at_fault) from e


def _int_option(options: Mapping[str, str], name: str, default: int) -> int:
    try:
        value = int(options.get(name, default))
    except ValueError as e:
        raise DriverError(f"options.{name} must be a whole number, not {options[name]!r}") from e
    if value < 0:
        raise DriverError(f"options.{name} must not be negative")
    return value


def _parse(xml: str) -> ET.Element:
    return ET.fromstring(xml)  # noqa: S314 - XML produced by libvirtd itself, not by a user


# --- Inventory -----------------------------------------------------------------------------------------


class PowerState(enum.Enum):
    RUNNING = "running"
    PAUSED = "paused"
    SHUT_OFF = "shut_off"
    OTHER = "other"


@dataclass(frozen=True)
class DiskInfo:
    """One disk of a domain: where it lives on its host and how large it is (virtual size)."""

    target: str
    path: str
    size_bytes: int
    format: str = "raw"


@dataclass(frozen=True)
class DomainInfo:
    """A domain as ``host-engine inventory sync`` records it."""

    name: str
    uuid: str
    vcpus: int
    memory_bytes: int
    disks: tuple[DiskInfo, ...]
    power_state: PowerState


def _power_state(lv: Any, state: int) -> PowerState:
    if state in (lv.VIR_DOMAIN_RUNNING, lv.VIR_DOMAIN_BLOCKED):
        return PowerState.RUNNING
    if state == lv.VIR_DOMAIN_PAUSED:
        return PowerState.PAUSED
    if state in (lv.VIR_DOMAIN_SHUTOFF, lv.VIR_DOMAIN_SHUTDOWN, lv.VIR_DOMAIN_CRASHED):
        return PowerState.SHUT_OFF
    return PowerState.OTHER


def _disks(dom: Any, *, inactive: bool = False) -> list[tuple[str, str, str, ET.Element]]:
    """(target dev, source path, format, <disk> element) of each file/block disk that holds data."""
    lv = _libvirt()
    flags = lv.VIR_DOMAIN_XML_INACTIVE if inactive else 0
    out = []
    for disk in _parse(dom.XMLDesc(flags)).findall("./devices/disk"):
        if disk.get("device", "disk") != "disk" or disk.find("readonly") is not None:
            continue
        source, target, driver = disk.find("source"), disk.find("target"), disk.find("driver")
        if source is None or target is None:
            continue
        path = source.get("file") or source.get("dev")
        if not path:
            continue
        fmt = driver.get("type", "raw") if driver is not None else "raw"
        out.append((target.get("dev", ""), path, fmt, disk))
    return out


def _disk_size(dom: Any, path: str) -> int:
    """A disk's virtual size: from its storage volume when a pool holds it, else from ``blockInfo``."""
    lv = _libvirt()
    with contextlib.suppress(lv.libvirtError):
        return int(dom.connect().storageVolLookupByPath(path).info()[1])
    try:
        capacity, _allocation, _physical = dom.blockInfo(path)
    except lv.libvirtError as e:
        raise DriverError(f"cannot read the size of {path}: {e}") from e
    return int(capacity)


def list_domains(uri: str) -> list[DomainInfo]:
    """Every domain defined or running at ``uri``, with vCPUs, memory, disks and power state."""
    lv = _libvirt()
    conn = _open(uri)
    try:
        result = []
        for dom in conn.listAllDomains(0):
            state, _max_kib, mem_kib, vcpus, _cpu = dom.info()
            disks = tuple(
                DiskInfo(target=dev, path=path, size_bytes=_disk_size(dom, path), format=fmt)
                for dev, path, fmt, _ in _disks(dom)
            )
            result.append(
                DomainInfo(
                    name=dom.name(),
                    uuid=dom.UUIDString(),
                    vcpus=int(vcpus),
                    memory_bytes=int(dom.maxMemory() or mem_kib) * 1024,
                    disks=disks,
                    power_state=_power_state(lv, state),
                )
            )
        return sorted(result, key=lambda d: d.name)
    except lv.libvirtError as e:
        raise DriverError(f"inventory of {uri} failed: {e}") from e
    finally:
        conn.close()


# --- Events ----------------------------------------------------------------------------------------------


class _EventLoop:
    """libvirt's default event loop in a daemon thread. libvirt allows one per process, registered before
    the first connection that wants events (and keepalives) is opened, so this is a process-wide singleton."""

    _lock = threading.Lock()
    _started = False

    @classmethod
    def ensure(cls) -> None:
        with cls._lock:
            if cls._started:
                return
            lv = _libvirt()
            lv.virEventRegisterDefaultImpl()
            thread = threading.Thread(target=cls._run, name="libvirt-events", daemon=True)
            thread.start()
            cls._started = True

    @staticmethod
    def _run() -> None:
        lv = _libvirt()
        while True:
            try:
                lv.virEventRunDefaultImpl()
            except Exception:  # the loop must never die; log and go on
                log.exception("libvirt event loop")
                time.sleep(0.1)


# --- One migration -----------------------------------------------------------------------------------------

# The driver's own lifecycle (Phase from base.py); anything else raises.
_TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.PREPARING: frozenset({Phase.DISK, Phase.MEMORY, Phase.SWITCHOVER, Phase.DONE, Phase.FAILED}),
    Phase.DISK: frozenset({Phase.MEMORY, Phase.SWITCHOVER, Phase.DONE, Phase.FAILED}),
    Phase.MEMORY: frozenset({Phase.SWITCHOVER, Phase.DONE, Phase.FAILED}),
    Phase.SWITCHOVER: frozenset({Phase.DONE, Phase.FAILED}),
    Phase.DONE: frozenset(),
    Phase.FAILED: frozenset(),
}
_ORDER = [Phase.PREPARING, Phase.DISK, Phase.MEMORY, Phase.SWITCHOVER, Phase.DONE]


@dataclass
class _Disk:
    target: str
    path: str
    format: str
    size_bytes: int
    alias: str
    iotune: dict[str, int] = field(default_factory=dict)


@dataclass
class _Sample:
    at_s: float
    processed_bytes: int
    disk_written_bytes: int


class LibvirtMigration(MigrationDriver):
    """One attempt at moving one domain between two libvirt hosts (see the module docstring).

    ``spec.options`` (all strings):
      ``domain``: the domain's name (default: ``spec.droplet_id``);
      ``peer_uri``: how the source libvirtd reaches the target's (default: ``spec.target_uri``);
      ``migrate_uri``: the address QEMU sends to (default: the target's ``migration_host``);
      ``bandwidth_mibps``: the bandwidth cap, set when the migration starts (default: unlimited);
      ``max_downtime_ms``: the initial downtime limit (default: QEMU's, 300 ms);
      ``auto_converge``: ``controlled`` (default), ``qemu`` or ``off``;
      ``auto_converge_max_pct``: with ``qemu``, QEMU's throttle cap (default 99, QEMU's own);
      ``paused``: ``1`` leaves the target paused at switchover (``VIR_MIGRATE_PAUSED``);
      ``tls``: ``1`` asks QEMU to encrypt the memory stream and the disk mirror (``VIR_MIGRATE_TLS``; both
      daemons need QEMU's migration certificates, else libvirt refuses the migration);
      ``keep_source_disks``: ``1`` keeps the source's disk files after success.
    """

    def __init__(
        self,
        spec: MigrationSpec,
        *,
        open_connection: Callable[[str], Any] = _open,
        clock: Callable[[], float] = time.monotonic,
        on_leftover: Callable[[LibvirtMigration], None] | None = None,
    ) -> None:
        self.spec = spec
        self._open = open_connection
        self._clock = clock
        # Told when the target could not be cleaned (unreachable): the hypervisor retries in the background.
        self._on_leftover = on_leftover
        opts = spec.options
        self.domain_name = opts.get("domain", spec.droplet_id)
        self.peer_uri = opts.get("peer_uri", spec.target_uri)
        self.migrate_uri = opts.get("migrate_uri")
        self.bandwidth_mibps = _int_option(opts, "bandwidth_mibps", 0)
        self.auto_converge = opts.get("auto_converge", "controlled")
        if self.auto_converge not in ("controlled", "qemu", "off"):
            raise DriverError(
                f"options.auto_converge must be controlled, qemu or off, not {self.auto_converge!r}"
            )
        self.qemu_max_throttle_pct = _int_option(opts, "auto_converge_max_pct", QEMU_MAX_THROTTLE_PCT)
        if not 1 <= self.qemu_max_throttle_pct <= QEMU_MAX_THROTTLE_PCT:
            raise DriverError(f"options.auto_converge_max_pct must be within 1..{QEMU_MAX_THROTTLE_PCT}")
        self.target_paused = opts.get("paused") == "1"
        tls = opts.get("tls", "0")
        if tls not in ("0", "1"):
            raise DriverError(f"options.tls must be 0 or 1, not {tls!r}")
        self.tls = tls == "1"
        self.keep_source_disks = opts.get("keep_source_disks") == "1"
        self._max_downtime_ms: int | None = (
            _int_option(opts, "max_downtime_ms", 0) if "max_downtime_ms" in opts else None
        )
        self._disk_limit_bps: int | None = None
        self._throttle_pct = 0
        self._phase = Phase.PREPARING
        self._lock = threading.Lock()
        self._src: Any = None
        self._dst: Any = None
        # The migration thread's own connection: a call in flight on a libvirt connection (migrateToURI3 runs
        # for the whole job) delays other calls on it by up to the 5 s keepalive interval (measured: jobStats,
        # state and blockStats took 5.0 s every few samples), so the controller's reads get their own.
        self._mig_conn: Any = None
        self._dom: Any = None
        self._uuid = ""
        self._disks: list[_Disk] = []
        self._created_volumes: list[str] = []
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._started_at: float | None = None
        self._samples: list[_Sample] = []
        self._round_seen = -1
        self._round_starts: list[int] = [0]
        self._qdevs: dict[str, str] = {}
        self._last_stats: dict[str, Any] = {}
        self._completed_stats: dict[str, Any] | None = None
        self._switchover_seen = False
        self._started_offline_copy = False
        self._callbacks: list[int] = []
        self._target_at_fault = False

    # -- connections ------------------------------------------------------------------------------------

    def _source(self) -> Any:
        if self._src is None or not self._alive(self._src):
            self._src = self._open(self.spec.source_uri)
        return self._src

    def _target(self) -> Any:
        if self._dst is None or not self._alive(self._dst):
            try:
                self._dst = self._open(self.spec.target_uri)
            except DriverError as e:
                raise DriverError(str(e), target_at_fault=True) from e
        return self._dst

    @staticmethod
    def _alive(conn: Any) -> bool:
        try:
            return bool(conn.isAlive()) and conn.getLibVersion() > 0
        except Exception:
            return False

    def _source_domain(self) -> Any:
        lv = _libvirt()
        try:
            return self._source().lookupByName(self.domain_name)
        except lv.libvirtError as e:
            raise DriverError(f"{self.domain_name} not found on {self.spec.source_host}: {e}") from e

    # -- phase --------------------------------------------------------------------------------------------

    def _advance(self, phase: Phase) -> None:
        """Move forward to ``phase`` (a no-op when already there or past it in the normal order)."""
        with self._lock:
            if phase is self._phase:
                return
            if phase in _ORDER and self._phase in _ORDER and _ORDER.index(phase) < _ORDER.index(self._phase):
                return
            if phase not in _TRANSITIONS[self._phase]:
                raise DriverError(f"illegal driver transition {self._phase.value} -> {phase.value}")
            self._phase = phase

    # -- MigrationDriver ----------------------------------------------------------------------------------
    # Each step turns libvirt's exceptions into DriverError, which is what the executor handles.

    def prepare_target(self) -> None:
        with _errors(f"preparing {self.spec.target_host}", target_at_fault=True):
            self._prepare_target()

    def start(self) -> None:
        with _errors("starting the migration"):
            self._start()

    def switchover(self) -> None:
        with _errors("switchover"):
            self._switchover()

    def abort(self) -> None:
        with _errors("abort"):
            self._abort()

    def finalize(self, success: bool) -> None:
        with _errors("finalize"):
            if success:
                self._finalize_success()
            else:
                self._abort()
        self.close()

    def close(self) -> None:
        """Close this attempt's connections (reopened if the handle is used again)."""
        self._unregister_events()
        if self._open is not _open:
            return  # injected connections belong to the caller
        for conn in (self._src, self._dst, self._mig_conn):
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
        self._src = self._dst = self._mig_conn = None

    def _prepare_target(self) -> None:
        _EventLoop.ensure()
        lv = _libvirt()
        dom = self._dom = self._source_domain()
        self._uuid = dom.UUIDString()
        active = bool(dom.isActive())
        if self.spec.offline and active:
            raise DriverError(f"{self.domain_name} runs on {self.spec.source_host}: not an offline migration")
        if not self.spec.offline and not active:
            raise DriverError(
                f"{self.domain_name} is shut off on {self.spec.source_host}: migrate it offline"
            )
        self._disks = []
        for dev, path, fmt, elem in _disks(dom):
            alias_el = elem.find("alias")
            iotune_el = elem.find("iotune")
            iotune = {}
            if iotune_el is not None:
                for child in iotune_el:
                    if child.tag in IOTUNE_TO_QMP and child.text:
                        iotune[child.tag] = int(child.text)
            alias = alias_el.get("name", "") if alias_el is not None else ""
            self._disks.append(_Disk(dev, path, fmt, _disk_size(dom, path), alias, iotune))
        if not self._disks:
            raise DriverError(f"{self.domain_name} has no disk to migrate")
        try:
            self._remove_target_leftovers()
            for disk in self._disks:
                self._create_target_volume(disk)
        except lv.libvirtError as e:
            raise DriverError(f"preparing {self.spec.target_host} failed: {e}", target_at_fault=True) from e
        log.info(
            "migration %s: target %s prepared (%d disk(s))",
            self.spec.migration_id,
            self.spec.target_host,
            len(self._disks),
        )

    def _start(self) -> None:
        lv = _libvirt()
        if self._dom is None:
            raise DriverError("start() before prepare_target()")
        dom = self._dom
        self._register_events()
        if self.spec.offline:
            # Start paused: the guest never runs on the source; the migration only carries its disks.
            try:
                dom.createWithFlags(lv.VIR_DOMAIN_START_PAUSED)
            except lv.libvirtError as e:
                raise DriverError(f"cannot start {self.domain_name} paused for the copy: {e}") from e
            self._started_offline_copy = True
            self._disks = [
                _Disk(d.target, d.path, d.format, d.size_bytes, self._alias(dom, d.target), d.iotune)
                for d in self._disks
            ]
        elif any(not d.alias for d in self._disks):
            self._disks = [
                _Disk(d.target, d.path, d.format, d.size_bytes, self._alias(dom, d.target), d.iotune)
                for d in self._disks
            ]
        if self._max_downtime_ms is not None:
            self._apply_max_downtime(self._max_downtime_ms)
        params: dict[str, Any] = {
            lv.VIR_MIGRATE_PARAM_MIGRATE_DISKS: [d.target for d in self._disks],
            lv.VIR_MIGRATE_PARAM_DEST_NAME: self.domain_name,
        }
        if self.migrate_uri:
            params[lv.VIR_MIGRATE_PARAM_URI] = self.migrate_uri
        if self.bandwidth_mibps > 0:
            params[lv.VIR_MIGRATE_PARAM_BANDWIDTH] = self.bandwidth_mibps
        flags = (
            lv.VIR_MIGRATE_LIVE
            | lv.VIR_MIGRATE_PEER2PEER
            | lv.VIR_MIGRATE_NON_SHARED_DISK
            | lv.VIR_MIGRATE_PERSIST_DEST
            | lv.VIR_MIGRATE_UNDEFINE_SOURCE
        )
        if self.auto_converge != "off" and not self.spec.offline:
            flags |= lv.VIR_MIGRATE_AUTO_CONVERGE
        if self.auto_converge == "controlled" and not self.spec.offline:
            initial = self._throttle_pct or DISARMED_THROTTLE_PCT
            params[lv.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INITIAL] = initial
            params[lv.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INCREMENT] = 1
        if self.target_paused or self.spec.offline:
            flags |= lv.VIR_MIGRATE_PAUSED
        if self.tls:
            flags |= lv.VIR_MIGRATE_TLS
        self._throttle_before_job()
        mig_dom = self._migration_domain()
        self._started_at = self._clock()
        self._thread = threading.Thread(
            target=self._migrate,
            args=(mig_dom, params, flags),
            name=f"migrate-{self.spec.migration_id}",
            daemon=True,
        )
        self._thread.start()
        log.info(
            "migration %s: %s → %s started (bandwidth cap %s MiB/s, flags %#x)",
            self.spec.migration_id,
            self.spec.source_host,
            self.spec.target_host,
            self.bandwidth_mibps or "no",
            flags,
        )

    def progress(self) -> Progress:
        """A snapshot stamped with the time it was *true*: the clock is read after libvirt answered.

        A call that blocks (libvirt busy completing the job) therefore makes the snapshot late, never
        stale-but-young: the controller's deadlines (switchover, stall) count from what was observed when.
        """
        lv = _libvirt()
        thread = self._thread
        if thread is not None and not thread.is_alive():
            return self._final_progress()
        stats: dict[str, Any] = {}
        if thread is not None and self._dom is not None:
            try:
                stats = self._job_stats(self._dom)
            except lv.libvirtError as e:
                log.debug("migration %s: jobStats: %s", self.spec.migration_id, e)
        if thread is not None and not thread.is_alive():
            return self._final_progress()  # the job ended while we asked: its end is the truth
        if stats.get("type", lv.VIR_DOMAIN_JOB_NONE) != lv.VIR_DOMAIN_JOB_NONE:
            self._last_stats = stats
            self._update_phase(stats)
        else:
            stats = self._last_stats
            if self._switchover_seen and self._phase in (Phase.DISK, Phase.MEMORY):
                # QEMU paused the source for its last pass and libvirt is finishing the job (no stats now).
                self._advance(Phase.SWITCHOVER)
        return self._progress_from(stats)

    def _throttle_before_job(self) -> None:
        """Set the controller's throttle level (disarmed at 0) in QEMU before the job starts.

        libvirt sets only the throttle's initial level and increment from the migration parameters and
        leaves max-cpu-throttle and the trigger threshold as QEMU has them, so the job starts under the
        controller's level, and start() returns at once instead of waiting for the job to appear (waiting
        took seconds and hid a small guest's disk phase from the controller).
        """
        if self.spec.offline or self.auto_converge == "off":
            return
        try:
            if self.auto_converge == "controlled":
                self._apply_throttle(self._throttle_pct)
            else:
                # QEMU's own policy, with its defaults (a parameter set by an earlier attempt persists in
                # the QEMU process) or the cap asked for.
                arguments = {"max-cpu-throttle": self.qemu_max_throttle_pct, "throttle-trigger-threshold": 50}
                self._qmp(self._dom, "migrate-set-parameters", arguments)
        except DriverError as e:
            log.warning("migration %s: throttle parameters not set: %s", self.spec.migration_id, e)

    def _job_stats(self, dom: Any) -> dict[str, Any]:
        """``jobStats()`` of the running job (its own method so a test can make it slow)."""
        return dict(dom.jobStats())

    def _migration_domain(self) -> Any:
        """The source domain on a connection of the migration thread's own (see ``_mig_conn``).

        Injected connections (libvirt's test driver in unit tests) are shared: the domain handle is reused.
        """
        if self._open is not _open:
            return self._dom
        lv = _libvirt()
        self._mig_conn = self._open(self.spec.source_uri)
        try:
            return self._mig_conn.lookupByUUIDString(self._uuid)
        except lv.libvirtError as e:
            raise DriverError(f"{self.domain_name} not found on {self.spec.source_host}: {e}") from e

    def set_disk_write_limit(self, bytes_per_s: int | None) -> None:
        lv = _libvirt()
        if bytes_per_s is not None and bytes_per_s <= 0:
            raise DriverError("a disk write limit must be positive (None lifts it)")
        if self._succeeded() or self._dom is None:
            # Before start: nothing runs yet. After switchover: the source QEMU (and its limit) is gone, and
            # the target never had it.
            self._disk_limit_bps = None if self._succeeded() else bytes_per_s
            return
        try:
            if not self._dom.isActive():
                self._disk_limit_bps = None
                return
        except lv.libvirtError:
            self._disk_limit_bps = None
            return
        with self._unless_ended():
            for disk in self._disks:
                self._qmp(self._dom, "block_set_io_throttle", self._io_throttle_args(disk, bytes_per_s))
        self._disk_limit_bps = None if self._succeeded() else bytes_per_s
        log.info(
            "migration %s: disk write limit on %s: %s",
            self.spec.migration_id,
            self.spec.source_host,
            f"{bytes_per_s} B/s" if bytes_per_s else "lifted",
        )

    def set_memory_throttle(self, percent: int) -> None:
        if not 0 <= percent <= 99:
            raise DriverError("memory throttle must be within 0..99 %")
        if not self._running():
            # Before start: used as the initial level. After the job: QEMU dropped its throttle already.
            self._throttle_pct = percent if self._thread is None else 0
            return
        if self.auto_converge != "controlled":
            log.warning(
                "migration %s: memory throttle %d %% ignored: auto_converge is %s",
                self.spec.migration_id,
                percent,
                self.auto_converge,
            )
            return
        if percent < self._throttle_pct and percent > 0:
            log.info(
                "migration %s: QEMU cannot lower a throttle mid-migration; keeping it", self.spec.migration_id
            )
            return
        with self._unless_ended():
            self._apply_throttle(percent)
        self._throttle_pct = percent if self._running() else 0

    def set_max_downtime(self, ms: int) -> None:
        if ms <= 0:
            raise DriverError("max downtime must be positive")
        self._max_downtime_ms = ms
        if self._dom is not None and self._thread is not None:
            with self._unless_ended():
                self._apply_max_downtime(ms)

    def set_bandwidth_limit(self, bytes_per_s: int | None) -> None:
        """Change the migration's bandwidth cap while it runs (``migrateSetMaxSpeed``, whole MiB/s)."""
        lv = _libvirt()
        mibps = 0 if bytes_per_s is None else max(1, bytes_per_s // (1024 * 1024))
        self.bandwidth_mibps = mibps
        if self._dom is not None and self._thread is not None and self._thread.is_alive():
            try:
                self._dom.migrateSetMaxSpeed(mibps or lv.VIR_DOMAIN_MIGRATE_MAX_SPEED_POSTCOPY - 1, 0)
            except lv.libvirtError as e:
                raise DriverError(f"cannot set the migration bandwidth: {e}") from e

    def _switchover(self) -> None:
        if self._dom is None or self._thread is None:
            raise DriverError("switchover() before start()")
        phase = self.progress().phase
        if phase in (Phase.SWITCHOVER, Phase.DONE):
            return
        if phase is not Phase.MEMORY:
            # Pausing while the disk mirror still copies would pause the guest for the whole copy.
            log.info(
                "migration %s: switchover asked in phase %s: not yet", self.spec.migration_id, phase.value
            )
            return
        with self._unless_ended():
            self._dom.suspend()
        if not self._running():
            return
        self._advance(Phase.SWITCHOVER)
        log.info("migration %s: switchover: source paused", self.spec.migration_id)

    def _abort(self) -> None:
        """``abortJob``, wait for the job's end, then let libvirt's outcome decide: a job that completed
        anyway (the abort came during its last steps) raises ``AlreadyCompleted`` and nothing is cleaned up
        (the target's copy is the droplet now); otherwise the source is checked and the target cleaned."""
        lv = _libvirt()
        thread = self._thread
        if thread is not None and thread.is_alive() and self._dom is not None:
            try:
                self._dom.abortJob()
            except lv.libvirtError as e:
                log.warning("migration %s: abortJob: %s", self.spec.migration_id, e)
            thread.join(ABORT_WAIT_S)
            if thread.is_alive():
                raise DriverError(f"the migration job did not stop within {ABORT_WAIT_S:.0f} s of abortJob")
        if self._succeeded():
            raise AlreadyCompleted("cannot abort: the migration completed and the target runs the droplet")
        if self._phase is not Phase.FAILED:
            self._fail("aborted")
        self._clean_after_failure()

    def _finalize_success(self) -> None:
        thread = self._thread
        if thread is None:
            raise DriverError("finalize(True) before start()")
        thread.join(FINALIZE_WAIT_S)
        if thread.is_alive() or not self._succeeded():
            raise DriverError(f"finalize(True) but the migration did not succeed: {self._error}")
        lv = _libvirt()
        try:
            tdom = self._target().lookupByUUIDString(self._uuid)
        except lv.libvirtError as e:
            raise DriverError(f"the target does not hold {self.domain_name} after migration: {e}") from e
        if self.spec.offline:
            if self.spec.power_on_after:
                tdom.resume()
            else:
                tdom.destroy()
        elif not self.target_paused:
            state, _reason = tdom.state()
            if state == lv.VIR_DOMAIN_PAUSED:
                tdom.resume()
        self._unregister_events()
        src = self._source()
        with contextlib.suppress(lv.libvirtError):
            leftover = src.lookupByUUIDString(self._uuid)
            if leftover.isActive():
                raise DriverError(f"{self.domain_name} still runs on {self.spec.source_host} after migration")
            leftover.undefine()
        if not self.keep_source_disks:
            for disk in self._disks:
                self._delete_volume(src, disk.path)
        log.info("migration %s: finalized on %s", self.spec.migration_id, self.spec.target_host)

    # -- the migration thread -------------------------------------------------------------------------------

    def _running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @contextlib.contextmanager
    def _unless_ended(self) -> Iterator[None]:
        """A control call on the source that fails because the job has just ended is not an error.

        A small guest can finish its migration between one controller tick and the next call: the source
        domain is then gone (or stopped) and QEMU/libvirt refuse the call. The outcome is the job's.
        """
        lv = _libvirt()
        try:
            yield
        except (DriverError, lv.libvirtError) as e:
            thread = self._thread
            if thread is not None:
                thread.join(END_RACE_WAIT_S)
                if not thread.is_alive():
                    log.info("migration %s: ignored, the job has ended: %s", self.spec.migration_id, e)
                    return
            if isinstance(e, DriverError):
                raise
            raise DriverError(str(e)) from e

    def _succeeded(self) -> bool:
        """The migration job has ended and the target holds the live copy now (see ``_settle``)."""
        self._settle()
        return self._phase is Phase.DONE

    def _settle(self) -> None:
        """Once the migration thread has returned: DONE or FAILED, from libvirt's word, decided once.

        ``migrateToURI3`` returning without error is the job's completion. When it reports an error, which
        host runs the domain decides: a target copy that runs while the source's does not is the droplet
        (libvirt resumes the target only after the source's QEMU sent its last page), whatever the error
        said.
        """
        thread = self._thread
        if thread is None or thread.is_alive() or self._phase in (Phase.DONE, Phase.FAILED):
            return
        if self._error is not None and self._target_runs_droplet():
            log.warning(
                "migration %s: migrateToURI3 reported %s, but %s runs the droplet and %s does not: completed",
                self.spec.migration_id,
                self._error,
                self.spec.target_host,
                self.spec.source_host,
            )
            self._error = None
        if self._error is None:
            self._advance(Phase.DONE)
        else:
            self._fail(str(self._error))

    def _target_runs_droplet(self) -> bool:
        """Whether the target holds the live copy: its domain runs (or, when asked to stay paused, is defined
        persistently, which libvirt does only at the end of the job) and the source's copy does not run."""
        lv = _libvirt()
        try:
            tdom = self._target().lookupByUUIDString(self._uuid)
            state = tdom.state()[0]
            if state != lv.VIR_DOMAIN_RUNNING:
                paused_ok = self.target_paused or self.spec.offline
                if not (paused_ok and state == lv.VIR_DOMAIN_PAUSED and tdom.isPersistent()):
                    return False
        except (lv.libvirtError, DriverError):
            return False
        try:
            sdom = self._source().lookupByUUIDString(self._uuid)
            return not (sdom.isActive() and sdom.state()[0] == lv.VIR_DOMAIN_RUNNING)
        except lv.libvirtError:
            return True  # undefined on the source: the job's last step
        except DriverError:
            # The source cannot be asked; the target was resumed, which libvirt does only after the source
            # stopped for good.
            return True

    def _migrate(self, dom: Any, params: dict[str, Any], flags: int) -> None:
        try:
            dom.migrateToURI3(self.peer_uri, params, flags)
        except BaseException as e:
            self._error = e
            log.warning("migration %s: migrateToURI3 failed: %s", self.spec.migration_id, e)
        else:
            log.info("migration %s: migrateToURI3 returned", self.spec.migration_id)

    # -- progress -----------------------------------------------------------------------------------------

    def _update_phase(self, stats: Mapping[str, Any]) -> None:
        lv = _libvirt()
        if self._switchover_seen:
            self._advance(Phase.SWITCHOVER)
            return
        with contextlib.suppress(lv.libvirtError):
            state, reason = self._dom.state()
            paused_for_switchover = state == lv.VIR_DOMAIN_PAUSED and reason in (
                lv.VIR_DOMAIN_PAUSED_MIGRATION,
                lv.VIR_DOMAIN_PAUSED_USER,
            )
            if paused_for_switchover and not self.spec.offline and int(stats.get("memory_processed", 0)):
                self._advance(Phase.SWITCHOVER)
                return
        if int(stats.get("memory_processed", 0)) > 0 or int(stats.get("memory_iteration", 0)) > 0:
            self._advance(Phase.MEMORY)
        else:
            self._advance(Phase.DISK)

    def _progress_from(self, stats: Mapping[str, Any]) -> Progress:
        mem_total = int(stats.get("memory_total", 0)) or self.spec.memory_bytes
        mem_processed = int(stats.get("memory_processed", 0))
        if self._phase in (Phase.PREPARING, Phase.DISK):
            # Until the mirror is in sync QEMU has not begun memory: all of it is still to copy.
            mem_remaining = mem_total
        else:
            mem_remaining = self._memory_left(stats)
        disk_total = int(stats.get("disk_total", 0))
        disk_processed = int(stats.get("disk_processed", 0))
        disk_remaining = int(stats.get("disk_remaining", 0))
        if disk_total == 0:
            # The mirror has not started (the target QEMU is starting): every disk byte is still to copy.
            disk_total = disk_remaining = sum(d.size_bytes for d in self._disks)
        processed = int(stats.get("data_processed", mem_processed + disk_processed))
        page = int(stats.get("memory_page_size", DEFAULT_PAGE_SIZE)) or DEFAULT_PAGE_SIZE
        written = self._disk_written_bytes()
        now = self._clock()  # after every libvirt call of this sample
        elapsed = now - self._started_at if self._started_at is not None else 0.0
        rate, disk_rate = self._rates(_Sample(now, processed, written))
        if self.bandwidth_mibps > 0:
            rate = min(rate, float(self.bandwidth_mibps * 1024 * 1024))
        return Progress(
            phase=self._phase,
            elapsed_s=elapsed,
            round=int(stats.get("memory_iteration", 0)),
            disk_total_bytes=disk_total,
            disk_processed_bytes=disk_processed,
            disk_remaining_bytes=disk_remaining,
            memory_total_bytes=mem_total,
            memory_processed_bytes=mem_processed,
            memory_remaining_bytes=mem_remaining,
            disk_dirty_rate_bps=disk_rate,
            memory_dirty_rate_bps=float(stats.get("memory_dirty_rate", 0)) * page,
            transfer_rate_bps=rate,
            disk_write_limit_bps=self._disk_limit_bps,
            memory_throttle_pct=self._throttle_pct,
            memory_throttle_in_force_pct=self._throttle_in_force(stats),
            max_downtime_ms=self._max_downtime_ms,
            downtime_ms=None,
            bytes_transferred=processed,
        )

    def _throttle_in_force(self, stats: Mapping[str, Any]) -> int | None:
        """QEMU's CPU throttle in force (``auto_converge_throttle``; absent while it does not throttle)."""
        if self.auto_converge != "controlled" or not stats:
            return None
        return int(stats.get("auto_converge_throttle", 0))

    def _final_progress(self) -> Progress:
        lv = _libvirt()
        self._settle()
        stats = self._completed_stats or {}
        if not stats and self._phase is Phase.DONE:
            with contextlib.suppress(lv.libvirtError, DriverError):
                tdom = self._target().lookupByUUIDString(self._uuid)
                stats = dict(tdom.jobStats(lv.VIR_DOMAIN_JOB_STATS_COMPLETED))
                self._completed_stats = stats
        merged = {**self._last_stats, **stats}
        base = self._progress_from(merged)
        elapsed = base.elapsed_s
        downtime = merged.get("downtime")
        processed = int(merged.get("data_processed", base.bytes_transferred))
        done = self._phase is Phase.DONE
        return Progress(
            phase=self._phase,
            elapsed_s=float(merged.get("time_elapsed", elapsed * 1000)) / 1000 if done else elapsed,
            round=base.round,
            disk_total_bytes=base.disk_total_bytes,
            disk_processed_bytes=base.disk_total_bytes if done else base.disk_processed_bytes,
            disk_remaining_bytes=0 if done else base.disk_remaining_bytes,
            memory_total_bytes=base.memory_total_bytes,
            memory_processed_bytes=base.memory_processed_bytes,
            memory_remaining_bytes=0 if done else base.memory_remaining_bytes,
            disk_dirty_rate_bps=0.0,
            memory_dirty_rate_bps=0.0,
            transfer_rate_bps=base.transfer_rate_bps,
            disk_write_limit_bps=self._disk_limit_bps,
            memory_throttle_pct=self._throttle_pct,
            max_downtime_ms=self._max_downtime_ms,
            downtime_ms=float(downtime) if downtime is not None and done else None,
            bytes_transferred=processed,
            error=None if done else self._error_text(),
            target_at_fault=self._target_at_fault,
        )

    def _memory_left(self, stats: Mapping[str, Any]) -> int:
        """What a pause now would still have to send: at least the dirty set this round started with.

        QEMU's ``memory_remaining`` is what is left *of the current pass*; it falls to ~0 at the end of every
        round even when the guest re-dirties everything meanwhile. Pausing on it (measured: 6.5 MiB
        "remaining" of a 48 MiB working set) gave a 1.4 s downtime. Until the next dirty sync the pages
        dirtied since the pass began are unknown; for a guest that converges they are fewer than the pass
        started with, so the larger of the two is a safe bound. Measured with the 48 MiB guest: with the
        first sample of the current round alone, a late sample now and then looked like a new low and
        delayed the controller's stall verdict from ~10 to 30 rounds.
        """
        iteration = int(stats.get("memory_iteration", 0))
        remaining = int(stats.get("memory_remaining", 0))
        if iteration != self._round_seen:
            # The first sample of a round may land late in it (a tick is not aligned with QEMU's rounds), so
            # the bound is the larger of this round's and the previous round's first samples.
            self._round_seen = iteration
            self._round_starts = [*self._round_starts[-1:], remaining]
        return max(remaining, *self._round_starts)

    def _rates(self, sample: _Sample) -> tuple[float, float]:
        """(transfer, guest disk write) rates in B/s, averaged over the last few seconds.

        Averaged because QEMU's disk mirror moves data in bursts (up to 16 MiB, then sleeps to honour the
        bandwidth cap): one-tick deltas swing between zero and line rate, and a controller fed with them
        would see "no transfer" half the time.
        """
        samples = self._samples
        if not samples or sample.at_s - samples[-1].at_s >= MIN_SAMPLE_GAP_S:
            samples.append(sample)
        while len(samples) > 2 and sample.at_s - samples[1].at_s >= RATE_WINDOW_S:
            samples.pop(0)
        first = samples[0]
        dt = sample.at_s - first.at_s
        if dt <= 0:
            return (0.0, 0.0)
        rate = max(0, sample.processed_bytes - first.processed_bytes) / dt
        disk_rate = max(0, sample.disk_written_bytes - first.disk_written_bytes) / dt
        return (rate, disk_rate)

    def _error_text(self) -> str:
        return str(self._error) if self._error is not None else "aborted"

    def _fail(self, why: str) -> None:
        if self._phase is Phase.FAILED:
            return
        if self._error is not None:
            self._target_at_fault = self._target_is_at_fault()
        self._advance(Phase.FAILED)
        log.warning("migration %s: failed: %s", self.spec.migration_id, why)

    def _target_is_at_fault(self) -> bool:
        lv = _libvirt()
        err = self._error
        if isinstance(err, lv.libvirtError) and err.get_error_code() == lv.VIR_ERR_OPERATION_ABORTED:
            return False
        try:
            self._target()
        except DriverError:
            return True
        text = str(err).lower()
        return any(s in text for s in ("end of file", "connection", "target", "destination", "remote"))

    def _disk_written_bytes(self) -> int:
        lv = _libvirt()
        total = 0
        if self._dom is None:
            return 0
        for disk in self._disks:
            with contextlib.suppress(lv.libvirtError):
                total += int(self._dom.blockStats(disk.target)[3])
        return total

    # -- throttles ------------------------------------------------------------------------------------------

    def _qdev(self, dom: Any, disk: _Disk) -> str:
        """QEMU's id of the disk's device: its QOM path from ``query-block`` (a virtio-blk-pci device's
        block backend sits on its ``virtio-backend`` child, which the bare alias does not name)."""
        if disk.alias not in self._qdevs:
            for block in self._qmp_list(dom, "query-block"):
                qdev = str(block.get("qdev", ""))
                if qdev == disk.alias or f"/{disk.alias}/" in qdev:
                    self._qdevs[disk.alias] = qdev
                    break
            else:
                raise DriverError(f"QEMU reports no block device for {disk.target} ({disk.alias})")
        return self._qdevs[disk.alias]

    def _io_throttle_args(self, disk: _Disk, write_bps: int | None) -> dict[str, Any]:
        args: dict[str, Any] = {"id": self._qdev(self._dom, disk)}
        for qmp_name in IOTUNE_TO_QMP.values():
            args[qmp_name] = 0
        for name, value in disk.iotune.items():
            args[IOTUNE_TO_QMP[name]] = value
        if write_bps is not None:
            if args["bps"]:
                # QEMU refuses a total limit together with a per-direction one: split the total.
                args["bps_rd"] = args["bps_rd"] or args["bps"]
                args["bps_wr"] = min(args["bps"], write_bps)
                args["bps"] = 0
            else:
                args["bps_wr"] = min(args["bps_wr"], write_bps) if args["bps_wr"] else write_bps
        return args

    def _apply_throttle(self, percent: int) -> None:
        if percent <= 0:
            arguments = {
                "cpu-throttle-initial": DISARMED_THROTTLE_PCT,
                "cpu-throttle-increment": 1,
                "max-cpu-throttle": DISARMED_THROTTLE_PCT,
                "throttle-trigger-threshold": DISARMED_TRIGGER_PCT,
            }
        else:
            arguments = {
                "cpu-throttle-initial": percent,
                "cpu-throttle-increment": max(1, percent - self._throttle_pct),
                "max-cpu-throttle": percent,
                "throttle-trigger-threshold": ARMED_TRIGGER_PCT,
            }
        self._qmp(self._dom, "migrate-set-parameters", arguments)

    def _apply_max_downtime(self, ms: int) -> None:
        lv = _libvirt()
        try:
            self._dom.migrateSetMaxDowntime(ms, 0)
        except lv.libvirtError as e:
            if self._dom.isActive():
                raise DriverError(f"cannot set the maximum downtime: {e}") from e

    def _qmp_list(self, dom: Any, command: str) -> list[dict[str, Any]]:
        result = self._qmp(dom, command, {})["return"]
        return list(result) if isinstance(result, list) else []

    def _qmp(self, dom: Any, command: str, arguments: Mapping[str, Any]) -> dict[str, Any]:
        lv, lvq = _libvirt(), _libvirt_qemu()
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = dict(arguments)
        request = json.dumps(message)
        try:
            reply = json.loads(lvq.qemuMonitorCommand(dom, request, QMP_FLAGS))
        except lv.libvirtError as e:
            raise DriverError(f"QMP {command} failed: {e}") from e
        if "error" in reply:
            raise DriverError(f"QMP {command} failed: {reply['error'].get('desc', reply['error'])}")
        result = reply.get("return", {})
        return {"return": result} if isinstance(result, list) else dict(result)

    @staticmethod
    def _alias(dom: Any, target: str) -> str:
        for dev, _path, _fmt, elem in _disks(dom):
            alias = elem.find("alias")
            if dev == target and alias is not None:
                return str(alias.get("name", ""))
        raise DriverError(f"disk {target} has no device alias in the running domain")

    # -- events ---------------------------------------------------------------------------------------------

    def _register_events(self) -> None:
        lv = _libvirt()
        src = self._source()
        try:
            self._callbacks.append(
                src.domainEventRegisterAny(
                    self._dom, lv.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None
                )
            )
            self._callbacks.append(
                src.domainEventRegisterAny(
                    self._dom, lv.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, self._on_job_completed, None
                )
            )
        except lv.libvirtError as e:
            # Events only sharpen progress (switchover seen at once, exact downtime); jobStats suffices.
            log.info("migration %s: no domain events: %s", self.spec.migration_id, e)

    def _unregister_events(self) -> None:
        src = self._src
        for cb in self._callbacks:
            with contextlib.suppress(Exception):
                src.domainEventDeregisterAny(cb)
        self._callbacks.clear()

    def _on_lifecycle(self, _conn: Any, _dom: Any, event: int, detail: int, _opaque: Any) -> None:
        lv = _libvirt()
        if event == lv.VIR_DOMAIN_EVENT_SUSPENDED and detail == lv.VIR_DOMAIN_EVENT_SUSPENDED_MIGRATED:
            self._switchover_seen = True

    def _on_job_completed(self, _conn: Any, _dom: Any, params: dict[str, Any], _opaque: Any) -> None:
        self._completed_stats = dict(params)

    # -- target and source storage --------------------------------------------------------------------------

    def _remove_target_leftovers(self) -> None:
        """Remove what an earlier attempt left on the target; refuse if another domain uses the paths."""
        lv = _libvirt()
        conn = self._target()
        paths = {d.path for d in self._disks}
        for tdom in conn.listAllDomains(0):
            same = tdom.UUIDString() == self._uuid or tdom.name() == self.domain_name
            if not same:
                clash = paths & {p for _, p, _, _ in _disks(tdom)}
                if clash:
                    raise DriverError(
                        f"{self.spec.target_host} uses {sorted(clash)} for {tdom.name()}",
                        target_at_fault=True,
                    )
                continue
            # Which copy is the droplet? The source's, when it runs (live) or is shut off (offline) here:
            # libvirt resumes a target only after the source stopped for good. A target copy that runs
            # while the source copy is paused may be the live one: never guess, leave it to recover().
            src_state = self._dom.state()[0]
            source_is_droplet = src_state == lv.VIR_DOMAIN_RUNNING or (
                self.spec.offline and src_state == lv.VIR_DOMAIN_SHUTOFF
            )
            if not source_is_droplet or (tdom.isActive() and tdom.state()[0] == lv.VIR_DOMAIN_RUNNING):
                raise DriverError(
                    f"{self.domain_name} exists on {self.spec.target_host} and may be live there; "
                    "resolve with recover()",
                    target_at_fault=True,
                )
            log.warning(
                "migration %s: removing leftover %s from %s",
                self.spec.migration_id,
                tdom.name(),
                self.spec.target_host,
            )
            _destroy_and_undefine(tdom)
        for disk in self._disks:
            self._delete_volume(conn, disk.path)

    def _create_target_volume(self, disk: _Disk) -> None:
        lv = _libvirt()
        conn = self._target()
        pool = _pool_for(conn, posixpath.dirname(disk.path))
        name = posixpath.basename(disk.path)
        xml = (
            f"<volume><name>{name}</name><capacity unit='bytes'>{disk.size_bytes}</capacity>"
            "<allocation unit='bytes'>0</allocation>"
            f"<target><format type='{disk.format}'/></target></volume>"
        )
        try:
            pool.createXML(xml, 0)
        except lv.libvirtError as e:
            raise DriverError(
                f"cannot create {disk.path} on {self.spec.target_host}: {e}", target_at_fault=True
            ) from e
        self._created_volumes.append(disk.path)

    @staticmethod
    def _delete_volume(conn: Any, path: str) -> bool:
        lv = _libvirt()
        pool = _pool_for(conn, posixpath.dirname(path))
        with contextlib.suppress(lv.libvirtError):
            pool.refresh(0)
        try:
            vol = pool.storageVolLookupByName(posixpath.basename(path))
        except lv.libvirtError:
            return False
        vol.delete(0)
        return True

    def _clean_after_failure(self) -> None:
        """Lift the throttle, make sure the source runs (or is shut off again), clean the target."""
        lv = _libvirt()
        self._unregister_events()
        problems = []
        try:
            dom = self._source().lookupByUUIDString(self._uuid) if self._uuid else None
        except lv.libvirtError as e:
            raise DriverError(f"the source lost {self.domain_name} during a failed migration: {e}") from e
        if dom is not None:
            if self._started_offline_copy:
                with contextlib.suppress(lv.libvirtError):
                    dom.destroy()
            elif dom.isActive():
                if self._disk_limit_bps is not None:
                    try:
                        for disk in self._disks:
                            self._qmp(dom, "block_set_io_throttle", self._io_throttle_args(disk, None))
                        self._disk_limit_bps = None
                    except DriverError as e:
                        problems.append(f"lifting the disk write limit: {e}")
                state, _reason = dom.state()
                if state == lv.VIR_DOMAIN_PAUSED:
                    dom.resume()
            elif not self.spec.offline:
                problems.append(f"{self.domain_name} is not running on {self.spec.source_host}")
        try:
            self.cleanup_target()
        except DriverError as e:
            if self._on_leftover is not None:
                self._on_leftover(self)
            raise DriverError(
                f"source checked; target not cleaned: {e}" + (f"; {'; '.join(problems)}" if problems else ""),
                target_at_fault=True,
            ) from e
        if problems:
            raise DriverError("; ".join(problems))

    def _lift_source_limits(self, dom: Any) -> None:
        """Put the source's disks back to their own I/O limits (a dead worker's write limit would stay)."""
        self._dom = dom
        self._disks = []
        for dev, path, fmt, elem in _disks(dom):
            alias_el, iotune_el = elem.find("alias"), elem.find("iotune")
            iotune = {}
            if iotune_el is not None:
                iotune = {c.tag: int(c.text) for c in iotune_el if c.tag in IOTUNE_TO_QMP and c.text}
            alias = alias_el.get("name", "") if alias_el is not None else ""
            self._disks.append(_Disk(dev, path, fmt, 0, alias, iotune))
        for block in self._qmp_list(dom, "query-block"):
            inserted = block.get("inserted") or {}
            for disk in self._disks:
                qdev = str(block.get("qdev", ""))
                if disk.alias and (qdev == disk.alias or f"/{disk.alias}/" in qdev):
                    own = self._io_throttle_args(disk, None)
                    if (
                        int(inserted.get("bps_wr", 0)) != own["bps_wr"]
                        or int(inserted.get("bps", 0)) != own["bps"]
                    ):
                        log.warning(
                            "recover %s: lifting a disk write limit on %s",
                            self.spec.migration_id,
                            disk.target,
                        )
                        self._qmp(dom, "block_set_io_throttle", own)

    def cleanup_target(self) -> None:
        """Remove this droplet's domain and this attempt's disks from the target. Idempotent.

        A target copy that *runs* is never removed here: after a failed attempt only a paused incoming copy
        can be there, and a running one may be the droplet (``LibvirtHypervisor.recover`` decides that).
        """
        lv = _libvirt()
        try:
            conn = self._target()
            with contextlib.suppress(lv.libvirtError):
                tdom = conn.lookupByUUIDString(self._uuid)
                if tdom.isActive() and tdom.state()[0] == lv.VIR_DOMAIN_RUNNING:
                    raise DriverError(f"{self.domain_name} runs on {self.spec.target_host}: not removed")
                _destroy_and_undefine(tdom)
            # Only volumes this attempt created: a path the target uses otherwise is never touched.
            for path in list(self._created_volumes):
                self._delete_volume(conn, path)
                self._created_volumes.remove(path)
        except lv.libvirtError as e:
            raise DriverError(f"cleaning {self.spec.target_host} failed: {e}", target_at_fault=True) from e


def _destroy_and_undefine(dom: Any) -> None:
    lv = _libvirt()
    with contextlib.suppress(lv.libvirtError):
        if dom.isActive():
            dom.destroy()
    try:
        dom.undefineFlags(lv.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | lv.VIR_DOMAIN_UNDEFINE_NVRAM)
    except lv.libvirtError:
        with contextlib.suppress(lv.libvirtError):  # a transient domain is gone once destroyed
            dom.undefine()


def _pool_for(conn: Any, directory: str) -> Any:
    """A storage pool over ``directory``: an existing one, or a transient ``dir`` pool made for it."""
    lv = _libvirt()
    for pool in conn.listAllStoragePools(0):
        target = _parse(pool.XMLDesc(0)).find("./target/path")
        if target is not None and (target.text or "").rstrip("/") == directory.rstrip("/"):
            if not pool.isActive():
                pool.create(0)
            return pool
    name = POOL_PREFIX + hashlib.sha1(directory.encode(), usedforsecurity=False).hexdigest()[:12]
    with contextlib.suppress(lv.libvirtError):
        return conn.storagePoolLookupByName(name)
    xml = f"<pool type='dir'><name>{name}</name><target><path>{directory}</path></target></pool>"
    try:
        return conn.storagePoolCreateXML(xml, 0)
    except lv.libvirtError as e:
        raise DriverError(f"cannot manage volumes in {directory}: {e}") from e


# --- The hypervisor back end -------------------------------------------------------------------------------


class LibvirtHypervisor:
    """The libvirt back end: one URI per host (``host_uris[host]``), a ``LibvirtMigration`` per attempt.

    ``peer_uris[host]`` is how the *other hosts' daemons* reach ``host`` for peer-to-peer migration, when
    that differs from the engine's own URI (e.g. the engine on a UNIX socket or an SSH tunnel, the daemons
    over TLS on the migration network); by default the engine's URI. ``options`` apply to every migration
    (``bandwidth_mibps`` etc., see ``LibvirtMigration``); a spec's own options win.
    """

    #: The per-attempt handle class (tests of slow libvirt answers substitute a subclass).
    migration_class: type[LibvirtMigration] = LibvirtMigration

    def __init__(
        self,
        host_uris: Mapping[str, str],
        *,
        peer_uris: Mapping[str, str] | None = None,
        options: Mapping[str, str] | None = None,
        open_connection: Callable[[str], Any] | None = None,
    ) -> None:
        self.host_uris = dict(host_uris)
        self.peer_uris = dict(peer_uris or {})
        self.options = dict(options or {})
        # Injected (tests share connections to libvirt's test driver): then connections are not closed here.
        self._open_connection = open_connection
        self._leftovers = _LeftoverSweeper()

    def migration(self, spec: MigrationSpec) -> LibvirtMigration:
        options = dict(self.options)
        if spec.target_host in self.peer_uris:
            options["peer_uri"] = self.peer_uris[spec.target_host]
        if options:
            spec = MigrationSpec(**{**spec.__dict__, "options": {**options, **spec.options}})
        # A new attempt to a target with leftovers of this droplet removes them itself (prepare_target).
        self._leftovers.forget(spec.target_host, spec.droplet_id)
        return self.migration_class(
            spec, open_connection=self._open_connection or _open, on_leftover=self._leftovers.add
        )

    def pending_leftovers(self) -> list[tuple[str, str]]:
        """(target host, droplet) of failed attempts whose target could not be cleaned yet."""
        return self._leftovers.pending()

    def _uri(self, host: str) -> str:
        try:
            return self.host_uris[host]
        except KeyError as e:
            raise DriverError(f"no libvirt URI configured for host {host}") from e

    def domain_state(self, host: str, droplet_id: str) -> DomainState:
        lv = _libvirt()
        conn = (self._open_connection or _open)(self._uri(host))
        try:
            try:
                dom = conn.lookupByName(droplet_id)
            except lv.libvirtError:
                return DomainState.ABSENT
            state = _power_state(lv, dom.state()[0])
            return {
                PowerState.RUNNING: DomainState.RUNNING,
                PowerState.PAUSED: DomainState.PAUSED,
            }.get(state, DomainState.SHUT_OFF)
        finally:
            if self._open_connection is None:
                conn.close()

    def recover(self, spec: MigrationSpec) -> Recovered:
        """See ``HypervisorDriver.recover``: make the droplet live on exactly one host and return it.

        A job still running (its worker died; libvirt's peer-to-peer job carries on alone) is aborted and
        waited for: nothing runs unsupervised, and QEMU drops its CPU throttle when the job ends. Then
        libvirt's word decides: the switchover completed when the target's copy *runs* (libvirt resumes it
        only after the source's QEMU sent its last page) or the source no longer has the domain; then the
        source's copy and disks are removed, as ``finalize(True)`` does, and the job's own stats (downtime,
        bytes, from the target's completed-job record) are returned. Otherwise the source copy is the
        droplet: its disk write limit is lifted, it is resumed (or, offline, shut off again) and the
        target's leftovers are removed.
        """
        lv = _libvirt()
        mig = self.migration(spec)
        try:
            src, dst = mig._source(), mig._target()
            sdom = _lookup(src, mig.domain_name)
            if sdom is not None and _job_active(sdom):
                log.warning("recover %s: aborting the orphaned migration job", spec.migration_id)
                with contextlib.suppress(lv.libvirtError):
                    sdom.abortJob()
                _wait_job_end(sdom)
                sdom = _lookup(src, mig.domain_name)
            tdom = _lookup(dst, mig.domain_name)
            if sdom is None or (tdom is not None and tdom.state()[0] == lv.VIR_DOMAIN_RUNNING):
                return self._recovered_on_target(mig, src, sdom, tdom)
            return self._recovered_on_source(mig, dst, sdom, tdom)
        except lv.libvirtError as e:
            raise DriverError(f"recovering {spec.migration_id} failed: {e}") from e
        finally:
            mig.close()

    @staticmethod
    def _recovered_on_target(mig: LibvirtMigration, src: Any, sdom: Any, tdom: Any) -> Recovered:
        """The switchover completed: remove the source's copy and disks; the job's stats from the target."""
        spec = mig.spec
        if tdom is None:
            raise DriverError(f"{mig.domain_name} is on neither {spec.source_host} nor {spec.target_host}")
        stats = _completed_job_stats(tdom)
        if sdom is not None:
            log.warning("recover %s: switchover completed; removing the source copy", spec.migration_id)
            _destroy_and_undefine(sdom)
        if not mig.keep_source_disks:
            used = {p for d in src.listAllDomains(0) for _, p, _, _ in _disks(d)}
            for _dev, path, _fmt, _el in _disks(tdom):
                if path not in used and mig._delete_volume(src, path):
                    log.info("recover %s: removed %s from %s", spec.migration_id, path, spec.source_host)
        return Recovered(spec.target_host, stats)

    @staticmethod
    def _recovered_on_source(mig: LibvirtMigration, dst: Any, sdom: Any, tdom: Any) -> Recovered:
        """The source's copy is the droplet: no limit left, running (offline: shut off); target clean."""
        lv = _libvirt()
        spec = mig.spec
        if spec.offline:
            if sdom.isActive():
                sdom.destroy()  # started paused for the copy: shut off again
        else:
            if not sdom.isActive():
                raise DriverError(f"{mig.domain_name} is shut off on {spec.source_host}; not resuming it")
            try:
                mig._lift_source_limits(sdom)
            except DriverError as e:
                log.warning("recover %s: disk write limits not checked: %s", spec.migration_id, e)
            if sdom.state()[0] == lv.VIR_DOMAIN_PAUSED:
                sdom.resume()
        mig._dom = sdom
        mig._uuid = sdom.UUIDString()
        mig._disks = [_Disk(t, p, f, 0, "") for t, p, f, _ in _disks(sdom)]
        if tdom is not None or any(_volume_exists(dst, d.path) for d in mig._disks):
            mig._remove_target_leftovers()
        return Recovered(spec.source_host, {})


def _job_active(dom: Any) -> bool:
    lv = _libvirt()
    try:
        return bool(dom.jobInfo()[0] != lv.VIR_DOMAIN_JOB_NONE)
    except lv.libvirtError:
        return False


def _wait_job_end(dom: Any) -> None:
    deadline = time.monotonic() + RECOVER_JOB_WAIT_S
    while _job_active(dom):
        if time.monotonic() > deadline:
            raise DriverError(
                f"the orphaned migration job of {dom.name()} did not end within {RECOVER_JOB_WAIT_S:.0f} s"
            )
        time.sleep(RECOVER_POLL_S)


def _completed_job_stats(tdom: Any) -> dict[str, object]:
    """The completed migration's own figures, from the target's completed-job record (empty if gone)."""
    lv = _libvirt()
    try:
        raw = dict(tdom.jobStats(lv.VIR_DOMAIN_JOB_STATS_COMPLETED))
    except lv.libvirtError:
        return {}
    stats: dict[str, object] = {}
    if "downtime" in raw:
        stats["downtime_ms"] = float(raw["downtime"])
    # The target's record counts the memory stream only (disk_* are 0 there: the mirror ran on the source);
    # the mirror copied every disk block at least once, so the disks' sizes are added: a lower bound.
    memory = int(raw.get("memory_processed") or raw.get("data_processed") or 0)
    disks = 0
    for _dev, path, _fmt, _el in _disks(tdom):
        with contextlib.suppress(lv.libvirtError, DriverError):
            disks += _disk_size(tdom, path)
    if memory or disks:
        stats["bytes_transferred"] = memory + disks
    if "time_elapsed" in raw:
        stats["duration_s"] = float(raw["time_elapsed"]) / 1000.0
    if "memory_iteration" in raw:
        stats["rounds"] = int(raw["memory_iteration"])
    return stats


class _LeftoverSweeper:
    """Failed attempts whose target could not be cleaned (its daemon was down), cleaned in a background thread
    as soon as the target answers again, without waiting for a retry to pick that host: the next attempt
    usually goes to another host (the target was at fault), so nothing else would come back for them.

    Held in memory: after an engine restart, ``LibvirtHypervisor.recover`` and the next attempt's
    ``prepare_target`` on that host remove what is left.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, str], tuple[LibvirtMigration, float]] = {}
        self._thread: threading.Thread | None = None

    def add(self, mig: LibvirtMigration) -> None:
        key = (mig.spec.target_host, mig.spec.droplet_id)
        with self._lock:
            self._pending.setdefault(key, (mig, time.monotonic()))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="libvirt-leftovers", daemon=True)
                self._thread.start()
        log.warning(
            "migration %s: %s holds leftovers of %s; removing them once it answers",
            mig.spec.migration_id,
            mig.spec.target_host,
            mig.spec.droplet_id,
        )

    def forget(self, target_host: str, droplet_id: str) -> None:
        with self._lock:
            self._pending.pop((target_host, droplet_id), None)

    def pending(self) -> list[tuple[str, str]]:
        with self._lock:
            return sorted(self._pending)

    def _run(self) -> None:
        while True:
            with self._lock:
                items = list(self._pending.items())
                if not items:
                    self._thread = None
                    return
            for key, (mig, since) in items:
                self._try(key, mig, since)
            time.sleep(LEFTOVER_RETRY_S)

    def _try(self, key: tuple[str, str], mig: LibvirtMigration, since: float) -> None:
        try:
            mig.cleanup_target()
        except DriverError as e:
            if time.monotonic() - since > LEFTOVER_GIVE_UP_S:
                log.error("migration %s: giving up cleaning %s: %s", mig.spec.migration_id, key[0], e)
            else:
                log.debug("migration %s: %s not cleaned yet: %s", mig.spec.migration_id, key[0], e)
                return
        except Exception:  # the sweeper must not die on an unexpected libvirt state
            log.exception("migration %s: cleaning %s", mig.spec.migration_id, key[0])
            return
        else:
            log.info("migration %s: leftovers removed from %s", mig.spec.migration_id, key[0])
        mig.close()
        with self._lock:
            if self._pending.get(key, (None, 0.0))[0] is mig:
                del self._pending[key]


def _lookup(conn: Any, name: str) -> Any | None:
    lv = _libvirt()
    try:
        return conn.lookupByName(name)
    except lv.libvirtError:
        return None


def _volume_exists(conn: Any, path: str) -> bool:
    lv = _libvirt()
    pool = _pool_for(conn, posixpath.dirname(path))
    with contextlib.suppress(lv.libvirtError):
        pool.refresh(0)
    try:
        pool.storageVolLookupByName(posixpath.basename(path))
    except lv.libvirtError:
        return False
    return True
