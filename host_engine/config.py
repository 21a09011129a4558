"""The engine's configuration: a TOML file (``--config`` / ``HOST_ENGINE_CONFIG``), then flags.

Built once at the entry point into a frozen :class:`EngineConfig` and passed down. Every key is optional::

    [store]
    url = "postgresql://engine@db/engine"     # or a SQLite path; --db / HOST_ENGINE_DB win

    [overcommit]                                # capacity x ratio is what placement may fill
    vcpu = 4.0
    memory = 1.0
    disk = 1.0

    [placement]
    anti_affinity = true                        # keep droplets with the same owner tag on different hosts
    [placement.weights]
    least_allocated = 1.0
    balanced_allocation = 1.0

    [notice]
    default = "10m"
    minimum = "10m"                             # shorter only with --unsafe-short-notice

    [concurrency]
    max_parallel = 4                            # migrations at once, fleet-wide
    max_per_target = 2                          # migrations at once into one host
    max_per_source = 2                          # migrations at once out of one host

    [schedule]
    bandwidth = "1GiB"                          # per second, to estimate how long a migration holds a slot
    slot_overhead = "2m"                        # added to each estimate (setup, switchover, slack)
    retry_backoff = "2m"                        # a failed attempt is retried after this, doubling ...
    retry_backoff_max = "30m"                   # ... up to this (migrate --now: seconds apart)

    [engine]
    poll_interval = "1s"
    worker = "host-a"                           # default: the hostname (one live process per name)
    driver = "auto"                             # "auto": each host by its URI; "sim"/"libvirt": insist on one
    lease = "60s"                               # another worker takes over a dead one's attempts after this
    renew_every = "10s"                         # how often a worker renews its claims (< lease / 3)
    max_concurrent = 4                          # attempts this worker runs at once

    [notifier]
    timeout = "5s"
    attempts = 4

    [metadata]
    ca_file = "/etc/host-engine/metadata-ca.pem"  # PEM bundle the admin listeners' certificates chain to

    [controller]
    max_downtime_ms = 300                       # the downtime budget (sim and libvirt), 10..10000
    initial_downtime_ms = 50                    # QEMU's first downtime limit, raised toward the budget

    [libvirt]                                   # only with driver = "libvirt"
    bandwidth_mibps = 0                         # migration bandwidth cap, MiB/s; 0: no cap
    tls = false                                 # VIR_MIGRATE_TLS: encrypt the memory stream and disk mirror
    sync_disk_writes = true                     # write-blocking disk mirror: no disk remainder in the pause
    parallel_connections = 4                    # multifd: memory over N connections (0 or 1: one)
    [libvirt.peer_uris]                         # host -> URI the other hosts' daemons reach it under
    hv2 = "qemu+tls://hv2.migration.example/system"
"""

from __future__ import annotations

import logging
import os
import socket
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from host_engine.controller import ControllerConfig
from host_engine.drivers.libvirt.job import DEFAULT_PARALLEL_CONNECTIONS, MAX_PARALLEL_CONNECTIONS
from host_engine.drivers.sim.settings import SIM_KEYS, SimSettings, sim_settings
from host_engine.errors import ConfigError, InvalidInput
from host_engine.timeparse import parse_duration
from host_engine.units import parse_size

log = logging.getLogger(__name__)

CONFIG_ENV = "HOST_ENGINE_CONFIG"
MIN_NOTICE = timedelta(minutes=10)
# The hypervisor drivers ``host-engine run`` drives migrations through (engine_steps.executor_step).
DRIVERS = ("auto", "sim", "libvirt")
# The driver follows from the host (engine_steps.plan_drivers): a libvirt URI is driven by libvirt, a
# ``sim://`` host (or one without a URI) by the simulator. "sim"/"libvirt" only insist, refusing the others.
DEFAULT_DRIVER = "auto"
# [controller] max_downtime_ms bounds: below 10 ms no switchover of a running guest fits (the pages dirtied
# while QEMU stops the vCPUs alone take longer), above 10 s a "live" migration is an outage.
MAX_DOWNTIME_MS_RANGE = (10, 10_000)
# [libvirt] bandwidth_mibps: 0 = no cap (libvirt's own default), the default. docs/libvirt.md measured why a
# cap should not be the default: what converges is what a guest re-dirties within bandwidth x downtime
# budget, and a guest rewriting 48 MiB converged in 2-4 rounds (30-60 ms downtime) uncapped but never at a
# 32 MiB/s cap (aborted as stalled, 0.5-1.5 GB sent for nothing). A cap is for sharing a link with other
# traffic; [concurrency] max_per_source already bounds how many migrations share a source's NIC.
DEFAULT_BANDWIDTH_MIBPS = 0
MAX_BANDWIDTH_MIBPS = 1_000_000  # ~1 TiB/s: anything above is a typo (bytes for MiB)
# [libvirt] tls: off by default. VIR_MIGRATE_TLS makes QEMU encrypt the memory stream and the NBD disk
# mirror, but every hypervisor's libvirtd then needs server AND client certificates for QEMU
# (/etc/pki/qemu: ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem, client-key.pem, or
# migrate_tls_x509_cert_dir in qemu.conf), and libvirt refuses the migration where they are missing. Those
# certificates are the fleet's to provision (the test harness has none); without TLS, keep the migration
# ports on a private network.
DEFAULT_MIGRATION_TLS = False


@dataclass(frozen=True)
class Overcommit:
    vcpu: float = 4.0
    memory: float = 1.0
    disk: float = 1.0


@dataclass(frozen=True)
class Weights:
    least_allocated: float = 1.0
    balanced_allocation: float = 1.0


@dataclass(frozen=True)
class PlacementConfig:
    overcommit: Overcommit = field(default_factory=Overcommit)
    weights: Weights = field(default_factory=Weights)
    anti_affinity: bool = True
    runners_up: int = 3


@dataclass(frozen=True)
class ScheduleConfig:
    """How the planner spaces migrations."""

    notice: timedelta = MIN_NOTICE
    minimum_notice: timedelta = MIN_NOTICE
    max_parallel: int = 4
    max_per_target: int = 2
    max_per_source: int = 2
    bandwidth_bps: int = 1024**3
    slot_overhead: timedelta = timedelta(minutes=2)
    max_attempts: int = 3
    # After a failed attempt ``host-engine run`` retries after retry_backoff, doubling up to retry_backoff_max
    # (+-20 % jitter); ``migrate --now`` retries seconds apart whatever these say.
    retry_backoff: timedelta = timedelta(minutes=2)
    retry_backoff_max: timedelta = timedelta(minutes=30)


# [engine] lease / renew_every: a worker renews its claims every 10 s; one not renewed for 60 s (by the
# database's clock) is presumed dead and another worker takes its attempts over. Five missed renewals before
# that, so a slow store round trip never hands a live attempt around.
DEFAULT_LEASE_S = 60.0
DEFAULT_RENEW_EVERY_S = 10.0
# A lease must outlast at least three renewals.
MIN_RENEWALS_PER_LEASE = 3
# [engine] max_concurrent: attempts one worker drives at once (the fleet's limits are [concurrency]).
DEFAULT_MAX_CONCURRENT = 4


@dataclass(frozen=True)
class EngineLoopConfig:
    poll_interval_s: float = 1.0
    worker: str = ""
    notifier_timeout_s: float = 5.0
    notifier_attempts: int = 4
    driver: str = DEFAULT_DRIVER
    # [metadata] ca_file: the PEM bundle the admin API client verifies the servers' certificates with
    # ("": the CA bundle of the engine's Python environment, certifi's).
    metadata_ca_file: str = ""
    lease_s: float = DEFAULT_LEASE_S
    renew_every_s: float = DEFAULT_RENEW_EVERY_S
    max_concurrent: int = DEFAULT_MAX_CONCURRENT


@dataclass(frozen=True)
class LibvirtConfig:
    """``[libvirt]``: what ``host-engine run --driver libvirt`` hands to ``LibvirtHypervisor``."""

    bandwidth_mibps: int = DEFAULT_BANDWIDTH_MIBPS
    tls: bool = DEFAULT_MIGRATION_TLS
    peer_uris: Mapping[str, str] = field(default_factory=dict)
    sync_disk_writes: bool = True
    parallel_connections: int = DEFAULT_PARALLEL_CONNECTIONS

    def options(self) -> dict[str, str]:
        """``LibvirtHypervisor(options=...)``: applied to every migration (the driver's defaults left out)."""
        options: dict[str, str] = {}
        if self.bandwidth_mibps:
            options["bandwidth_mibps"] = str(self.bandwidth_mibps)
        if self.tls:
            options["tls"] = "1"
        if not self.sync_disk_writes:
            options["sync_writes"] = "0"
        if self.parallel_connections != DEFAULT_PARALLEL_CONNECTIONS:
            options["parallel_connections"] = str(self.parallel_connections)
        return options


@dataclass(frozen=True)
class EngineConfig:
    db: str = ""
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    engine: EngineLoopConfig = field(default_factory=EngineLoopConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    libvirt: LibvirtConfig = field(default_factory=LibvirtConfig)
    sim: SimSettings = field(default_factory=SimSettings)
    source: str = "defaults"

    @property
    def worker_id(self) -> str:
        """This worker's name: ``[engine] worker``, else the hostname. Stable across restarts, so a
        restarted engine takes its own attempts back at once; held by one live process at a time
        (``host_engine.workers``)."""
        return self.engine.worker or socket.gethostname()


_KNOWN: dict[str, set[str]] = {
    "store": {"url"},
    "overcommit": {"vcpu", "memory", "disk"},
    "placement": {"anti_affinity", "weights", "runners_up"},
    "notice": {"default", "minimum"},
    "concurrency": {"max_parallel", "max_per_target", "max_per_source"},
    "schedule": {"bandwidth", "slot_overhead", "max_attempts", "retry_backoff", "retry_backoff_max"},
    "engine": {
        "poll_interval",
        "late_notice_grace",
        "worker",
        "driver",
        "lease",
        "renew_every",
        "max_concurrent",
    },
    "notifier": {"timeout", "attempts"},
    "metadata": {"ca_file"},
    "controller": {"max_downtime_ms", "initial_downtime_ms"},
    "libvirt": {"bandwidth_mibps", "tls", "peer_uris", "sync_disk_writes", "parallel_connections"},
    "sim": set(SIM_KEYS),
}


def _get(doc: Mapping[str, Any], section: str, key: str, kind: type | tuple[type, ...]) -> Any:
    sec = doc.get(section, {})
    if key not in sec:
        return None
    value = sec[key]
    if isinstance(value, bool) and kind is not bool and bool not in (kind if isinstance(kind, tuple) else ()):
        raise ConfigError(f"config [{section}] {key}: expected {_kind_name(kind)}, got {value!r}")
    if not isinstance(value, kind):
        raise ConfigError(f"config [{section}] {key}: expected {_kind_name(kind)}, got {value!r}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def _positive(section: str, key: str, value: float) -> float:
    if value <= 0:
        raise ConfigError(f"config [{section}] {key}: must be positive, got {value!r}")
    return value


def _duration(doc: Mapping[str, Any], section: str, key: str) -> timedelta | None:
    raw = _get(doc, section, key, (str, int, float))
    if raw is None:
        return None
    try:
        return parse_duration(str(raw), field=f"[{section}] {key}")
    except InvalidInput as e:
        raise ConfigError(f"config {e}") from e


def _positive_duration(doc: Mapping[str, Any], section: str, key: str) -> timedelta | None:
    value = _duration(doc, section, key)
    if value is not None and value <= timedelta(0):
        raise ConfigError(f"config [{section}] {key}: must be positive, got {value}")
    return value


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"overcommit.vcpu=2"`` -> (["overcommit", "vcpu"], 2). The value is read as TOML, else as a string."""
    key, sep, raw = item.partition("=")
    path = [part.strip() for part in key.split(".")]
    if not sep or len(path) < 2 or not all(path):
        raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE (e.g. overcommit.vcpu=2)")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return path, value


def apply_overrides(doc: Mapping[str, Any], items: Sequence[str]) -> dict[str, Any]:
    """A copy of ``doc`` with each ``SECTION.KEY=VALUE`` of ``items`` set (flags win over the file)."""
    out: dict[str, Any] = dict(doc)
    for item in items:
        path, value = parse_override(item)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
        node[path[-1]] = value
    return out


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Sequence[str] = (),
) -> EngineConfig:
    """Read the TOML file at ``path`` (or ``$HOST_ENGINE_CONFIG``; none: the defaults), then ``overrides``."""
    env = os.environ if env is None else env
    chosen = os.fspath(path) if path is not None else env.get(CONFIG_ENV) or None
    if chosen is None:
        return (
            config_from_dict(apply_overrides({}, overrides), source="flags") if overrides else EngineConfig()
        )
    try:
        doc = tomllib.loads(Path(chosen).read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"config file {chosen} does not exist") from e
    except OSError as e:
        raise ConfigError(f"cannot read config file {chosen}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {chosen} is not valid TOML: {e}") from e
    return config_from_dict(apply_overrides(doc, overrides), source=chosen)


def config_from_dict(doc: Mapping[str, Any], *, source: str = "dict") -> EngineConfig:
    """Validate a parsed config document (unknown sections and keys are refused, naming them)."""
    for section, value in doc.items():
        if section not in _KNOWN:
            raise ConfigError(f"config: unknown section [{section}] (known: {', '.join(sorted(_KNOWN))})")
        if not isinstance(value, dict):
            raise ConfigError(f"config: [{section}] must be a table")
        unknown = set(value) - _KNOWN[section]
        if unknown:
            raise ConfigError(f"config: unknown key [{section}] {sorted(unknown)[0]}")
    db = _get(doc, "store", "url", str) or ""
    return EngineConfig(
        db=db,
        placement=_placement(doc),
        schedule=_schedule(doc),
        engine=_engine(doc),
        controller=_controller(doc),
        libvirt=_libvirt(doc),
        sim=_sim(doc),
        source=source,
    )


def _placement(doc: Mapping[str, Any]) -> PlacementConfig:
    placement = PlacementConfig()
    oc = placement.overcommit
    for key in ("vcpu", "memory", "disk"):
        v = _get(doc, "overcommit", key, (int, float))
        if v is not None:
            oc = replace(oc, **{key: float(_positive("overcommit", key, float(v)))})
    weights = placement.weights
    raw_weights = doc.get("placement", {}).get("weights", {})
    if not isinstance(raw_weights, dict):
        raise ConfigError("config: [placement.weights] must be a table")
    known_weights = {f.name for f in fields(Weights)}
    for key, v in raw_weights.items():
        if key not in known_weights:
            raise ConfigError(
                f"config: unknown weigher [placement.weights] {key} (known: {sorted(known_weights)})"
            )
        if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
            raise ConfigError(f"config [placement.weights] {key}: expected a number >= 0, got {v!r}")
        weights = replace(weights, **{key: float(v)})
    placement = replace(placement, overcommit=oc, weights=weights)
    aa = _get(doc, "placement", "anti_affinity", bool)
    if aa is not None:
        placement = replace(placement, anti_affinity=aa)
    ru = _get(doc, "placement", "runners_up", int)
    if ru is not None:
        placement = replace(placement, runners_up=max(0, ru))
    return placement


def _schedule(doc: Mapping[str, Any]) -> ScheduleConfig:
    sched = ScheduleConfig()
    notice = _duration(doc, "notice", "default")
    if notice is not None:
        sched = replace(sched, notice=notice)
    minimum = _duration(doc, "notice", "minimum")
    if minimum is not None:
        sched = replace(sched, minimum_notice=minimum)
    for key in ("max_parallel", "max_per_target", "max_per_source"):
        n = _get(doc, "concurrency", key, int)
        if n is not None:
            limits: dict[str, Any] = {key: int(_positive("concurrency", key, n))}
            sched = replace(sched, **limits)
    bw = _get(doc, "schedule", "bandwidth", (str, int))
    if bw is not None:
        try:
            bps = parse_size(str(bw), field="[schedule] bandwidth") if isinstance(bw, str) else bw
        except InvalidInput as e:
            raise ConfigError(f"config {e}") from e
        sched = replace(sched, bandwidth_bps=int(_positive("schedule", "bandwidth", bps)))
    so = _duration(doc, "schedule", "slot_overhead")
    if so is not None:
        sched = replace(sched, slot_overhead=so)
    ma = _get(doc, "schedule", "max_attempts", int)
    if ma is not None:
        sched = replace(sched, max_attempts=int(_positive("schedule", "max_attempts", ma)))
    backoff = _positive_duration(doc, "schedule", "retry_backoff")
    if backoff is not None:
        sched = replace(sched, retry_backoff=backoff)
    backoff_max = _positive_duration(doc, "schedule", "retry_backoff_max")
    if backoff_max is not None:
        sched = replace(sched, retry_backoff_max=backoff_max)
    if sched.retry_backoff > sched.retry_backoff_max:
        raise ConfigError(
            f"config [schedule] retry_backoff ({sched.retry_backoff}) is longer than retry_backoff_max "
            f"({sched.retry_backoff_max})"
        )
    return sched


def _worker_settings(doc: Mapping[str, Any], eng: EngineLoopConfig) -> EngineLoopConfig:
    """``[engine] lease``, ``renew_every``, ``max_concurrent``: one worker among several."""
    lease = _duration(doc, "engine", "lease")
    if lease is not None:
        eng = replace(eng, lease_s=_positive("engine", "lease", lease.total_seconds()))
    renew = _duration(doc, "engine", "renew_every")
    if renew is not None:
        eng = replace(eng, renew_every_s=_positive("engine", "renew_every", renew.total_seconds()))
    if eng.renew_every_s * MIN_RENEWALS_PER_LEASE > eng.lease_s:
        raise ConfigError(
            f"config [engine] renew_every ({eng.renew_every_s:g}s) must be at most a third of lease "
            f"({eng.lease_s:g}s), so a slow renewal never lets a live worker's claims expire"
        )
    mc = _get(doc, "engine", "max_concurrent", int)
    if mc is not None:
        eng = replace(eng, max_concurrent=int(_positive("engine", "max_concurrent", mc)))
    return eng


def _engine(doc: Mapping[str, Any]) -> EngineLoopConfig:
    eng = EngineLoopConfig()
    pi = _duration(doc, "engine", "poll_interval")
    if pi is not None:
        eng = replace(eng, poll_interval_s=_positive("engine", "poll_interval", pi.total_seconds()))
    if _duration(doc, "engine", "late_notice_grace") is not None:
        # Kept readable so older configs still load: every notice now gives the guest its full notice from the
        # moment it was told (not_before moves as needed), so there is no grace left to configure.
        log.warning("config [engine] late_notice_grace is ignored: a guest always gets its full notice")
    worker = _get(doc, "engine", "worker", str)
    if worker is not None:
        eng = replace(eng, worker=worker)
    driver = _get(doc, "engine", "driver", str)
    if driver is not None:
        if driver not in DRIVERS:
            raise ConfigError(f"config [engine] driver: expected one of {', '.join(DRIVERS)}, got {driver!r}")
        eng = replace(eng, driver=driver)
    eng = _worker_settings(doc, eng)
    to = _duration(doc, "notifier", "timeout")
    if to is not None:
        eng = replace(eng, notifier_timeout_s=_positive("notifier", "timeout", to.total_seconds()))
    at = _get(doc, "notifier", "attempts", int)
    if at is not None:
        eng = replace(eng, notifier_attempts=int(_positive("notifier", "attempts", at)))
    ca = _get(doc, "metadata", "ca_file", str)
    if ca is not None:
        if not ca.strip():
            raise ConfigError("config [metadata] ca_file: must be a path to a PEM file, got an empty string")
        # Read when the engine starts (host_engine.metadata.client.check_ca_file): a missing file fails there.
        eng = replace(eng, metadata_ca_file=os.path.expanduser(ca.strip()))
    return eng


def _controller(doc: Mapping[str, Any]) -> ControllerConfig:
    ctl = ControllerConfig()
    md = _get(doc, "controller", "max_downtime_ms", int)
    if md is not None:
        low, high = MAX_DOWNTIME_MS_RANGE
        if not low <= md <= high:
            raise ConfigError(f"config [controller] max_downtime_ms: must be within {low}..{high}, got {md}")
        ctl = replace(ctl, max_downtime_ms=md)
    first = _get(doc, "controller", "initial_downtime_ms", int)
    if first is not None:
        low, high = MAX_DOWNTIME_MS_RANGE[0], ctl.max_downtime_ms
        if not low <= first <= high:
            raise ConfigError(
                f"config [controller] initial_downtime_ms: must be within {low}..max_downtime_ms ({high}), "
                f"got {first}"
            )
        ctl = replace(ctl, initial_downtime_ms=first)
    return ctl


def _sim(doc: Mapping[str, Any]) -> SimSettings:
    try:
        return sim_settings(doc.get("sim"))
    except ValueError as e:
        raise ConfigError(f"config {e}") from e


def _libvirt(doc: Mapping[str, Any]) -> LibvirtConfig:
    lc = LibvirtConfig()
    bw = _get(doc, "libvirt", "bandwidth_mibps", int)
    if bw is not None:
        if not 0 <= bw <= MAX_BANDWIDTH_MIBPS:
            raise ConfigError(
                f"config [libvirt] bandwidth_mibps: must be within 0..{MAX_BANDWIDTH_MIBPS} "
                f"(MiB/s; 0 = no cap), got {bw}"
            )
        lc = replace(lc, bandwidth_mibps=bw)
    tls = _get(doc, "libvirt", "tls", bool)
    if tls is not None:
        lc = replace(lc, tls=tls)
    sync = _get(doc, "libvirt", "sync_disk_writes", bool)
    if sync is not None:
        lc = replace(lc, sync_disk_writes=sync)
    channels = _get(doc, "libvirt", "parallel_connections", int)
    if channels is not None:
        if not 0 <= channels <= MAX_PARALLEL_CONNECTIONS:
            raise ConfigError(
                f"config [libvirt] parallel_connections: must be within 0..{MAX_PARALLEL_CONNECTIONS} "
                f"(0 or 1: one connection), got {channels}"
            )
        lc = replace(lc, parallel_connections=channels)
    peers = _get(doc, "libvirt", "peer_uris", dict)
    if peers is not None:
        checked: dict[str, str] = {}
        for host, uri in peers.items():
            if not isinstance(uri, str) or "://" not in uri or not uri.split("://", 1)[0]:
                raise ConfigError(
                    f"config [libvirt] peer_uris.{host}: expected a libvirt URI such as "
                    f"qemu+tls://{host}.migration.example/system, got {uri!r}"
                )
            checked[str(host)] = uri
        lc = replace(lc, peer_uris=checked)
    return lc
