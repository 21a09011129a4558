"""``[sim]``: what the simulator (and the predictions made with it) assumes of hosts and droplets.

    [sim]
    link_mibps = 1192            # every host's link unless [sim.hosts] says otherwise (default 10 Gbit/s)
    mirror_mibps = 250           # the disk mirror's own speed, when below the link (default: the link)
    setup_s = 2.7                # target preparation, target QEMU start, begin/confirm
    switchover_ms = 30           # the pause's cost beyond moving the remainder
    default_workload = "web"     # idle | web | database | log_writer | cache | diabolical
    sync_disk_writes = true      # write-blocking disk mirror, as [libvirt] sync_disk_writes (false: not)

    [sim.hosts.hv2]
    link_mibps = 100
    setup_s = 4.0
    memory_page_bytes = 4096     # granularity of droplets that appear there (default: QEMU's, bounded)
    disk_block_bytes = 65536

    [sim.droplets.db1]           # a named model, or numbers (MiB, MiB/s); omitted numbers: the model's
    workload = "database"
    memory_rate_mibps = 120
    memory_hot_mib = 1024
    memory_resident_mib = 6000
    disk_rate_mibps = 40
    disk_hot_mib = 4096
    disk_allocated_mib = 30000
    memory_pattern = "periodic"  # random | sequential | periodic (whole hot set in bursts, rate/hot a second)

``host-engine sim calibrate`` prints such a section fitted from the store's records of real migrations.
Every value is checked; a bad one is a ``ValueError`` naming the key (the config loader turns it into one
line).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from host_engine.drivers.sim.model import HostModel, SimWorld
from host_engine.drivers.sim.workloads import DEFAULT_NIC_BPS, WORKLOADS, MiB, Pattern, Workload

_HOST_KEYS = frozenset(
    {
        "link_mibps",
        "mirror_mibps",
        "setup_s",
        "switchover_ms",
        "memory_page_bytes",
        "disk_block_bytes",
        "sync_disk_writes",
    }
)
SIM_KEYS = frozenset(_HOST_KEYS | {"default_workload", "hosts", "droplets"})
# Droplet numbers: config key -> (Workload field, multiplier).
_DROPLET_NUMBERS: dict[str, tuple[str, int]] = {
    "memory_rate_mibps": ("memory_rate_bps", MiB),
    "memory_hot_mib": ("memory_hot_bytes", MiB),
    "memory_resident_mib": ("memory_resident_bytes", MiB),
    "disk_rate_mibps": ("disk_rate_bps", MiB),
    "disk_hot_mib": ("disk_hot_bytes", MiB),
    "disk_allocated_mib": ("disk_allocated_bytes", MiB),
}
_DROPLET_PATTERNS = ("memory_pattern", "disk_pattern")
_DROPLET_KEYS = frozenset({"workload", *_DROPLET_NUMBERS, *_DROPLET_PATTERNS})
MAX_LINK_MIBPS = 1 << 20  # 1 TiB/s
MAX_MIB = 1 << 30  # 1 PiB


@dataclass(frozen=True)
class SimHost:
    link_bps: float = DEFAULT_NIC_BPS
    model: HostModel = field(default_factory=HostModel)


@dataclass(frozen=True)
class SimSettings:
    default_host: SimHost = field(default_factory=SimHost)
    default_workload: str = "web"
    hosts: Mapping[str, SimHost] = field(default_factory=dict)
    droplets: Mapping[str, Workload] = field(default_factory=dict)

    def host(self, name: str) -> SimHost:
        return self.hosts.get(name, self.default_host)

    def workload(self, droplet_id: str) -> Workload:
        return self.droplets.get(droplet_id) or WORKLOADS[self.default_workload]()


def _number(where: str, key: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where} {key}: expected a number, got {value!r}")
    if not (math.isfinite(value) and low <= value <= high):
        raise ValueError(f"{where} {key}: must be within {low:g}..{high:g}, got {value!r}")
    return float(value)


def _host(where: str, doc: Mapping[str, Any], base: SimHost) -> SimHost:
    unknown = set(doc) - _HOST_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown key {sorted(unknown)[0]}")
    link_bps = base.link_bps
    if "link_mibps" in doc:
        link_bps = _number(where, "link_mibps", doc["link_mibps"], 0.001, MAX_LINK_MIBPS) * MiB
    changes: dict[str, Any] = {}
    if "mirror_mibps" in doc:
        mirror_mibps = _number(where, "mirror_mibps", doc["mirror_mibps"], 0.001, MAX_LINK_MIBPS)
        changes["mirror_bps"] = mirror_mibps * MiB
    if "setup_s" in doc:
        changes["setup_s"] = _number(where, "setup_s", doc["setup_s"], 0, 3600)
    if "switchover_ms" in doc:
        changes["switchover_ms"] = _number(where, "switchover_ms", doc["switchover_ms"], 0, 60_000)
    for key in ("memory_page_bytes", "disk_block_bytes"):
        if key in doc:
            v = doc[key]
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{where} {key}: expected a whole number of bytes, got {v!r}")
            changes[key] = v
    if "sync_disk_writes" in doc:
        v = doc["sync_disk_writes"]
        if not isinstance(v, bool):
            raise ValueError(f"{where} sync_disk_writes: expected true or false, got {v!r}")
        changes["sync_disk_writes"] = v
    try:
        model = replace(base.model, **changes)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e
    return SimHost(link_bps, model)


def _droplet(where: str, value: Any, default: str) -> Workload:
    if isinstance(value, str):
        value = {"workload": value}
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: expected a workload name or a table, got {value!r}")
    unknown = set(value) - _DROPLET_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown key {sorted(unknown)[0]}")
    name = value.get("workload", default)
    if name not in WORKLOADS:
        raise ValueError(f"{where} workload: unknown model {name!r} (known: {', '.join(WORKLOADS)})")
    workload = WORKLOADS[name]()
    changes: dict[str, Any] = {}
    for key, (attr, unit) in _DROPLET_NUMBERS.items():
        if key in value:
            number = _number(where, key, value[key], 0, MAX_MIB) * unit
            changes[attr] = number if attr.endswith("_bps") else int(number)
    for key in _DROPLET_PATTERNS:
        if key in value:
            known = [p.value for p in Pattern]
            if value[key] not in known:
                raise ValueError(f"{where} {key}: expected one of {', '.join(known)}, got {value[key]!r}")
            changes[key] = Pattern(value[key])
    return replace(workload, **changes)


def sim_settings(doc: Mapping[str, Any] | None) -> SimSettings:
    """``[sim]`` as parsed TOML (None: every default)."""
    if not doc:
        return SimSettings()
    unknown = set(doc) - SIM_KEYS
    if unknown:
        raise ValueError(f"[sim]: unknown key {sorted(unknown)[0]}")
    default_host = _host("[sim]", {k: v for k, v in doc.items() if k in _HOST_KEYS}, SimHost())
    default_workload = doc.get("default_workload", "web")
    if default_workload not in WORKLOADS:
        raise ValueError(
            f"[sim] default_workload: unknown model {default_workload!r} (known: {', '.join(WORKLOADS)})"
        )
    hosts_doc = doc.get("hosts", {})
    droplets_doc = doc.get("droplets", {})
    if not isinstance(hosts_doc, Mapping) or not isinstance(droplets_doc, Mapping):
        raise ValueError("[sim] hosts and droplets must be tables")
    hosts = {}
    for name, h in hosts_doc.items():
        if not isinstance(h, Mapping):
            raise ValueError(f"[sim.hosts.{name}]: expected a table, got {h!r}")
        hosts[str(name)] = _host(f"[sim.hosts.{name}]", h, default_host)
    droplets = {str(d): _droplet(f"[sim.droplets.{d}]", v, default_workload) for d, v in droplets_doc.items()}
    return SimSettings(default_host, default_workload, hosts, droplets)


def apply_settings(world: SimWorld, settings: SimSettings) -> None:
    """Run ``world`` under ``settings``: every host's costs and granularity, the link of hosts with no stored
    NIC, the workload of droplets that have no state yet. In-memory hosts get their link at once; a
    ``StoredWorld`` applies it at its next ``refresh`` to hosts it keeps no row for."""
    world.default_host_model = settings.default_host.model
    world.host_models = {name: h.model for name, h in settings.hosts.items()}
    for name, host in world.hosts.items():
        host.nic_bps = settings.host(name).link_bps
    from host_engine.drivers.sim.stored import StoredWorld  # the store's world: only when there is one

    if isinstance(world, StoredWorld):
        world.workload_of = settings.workload
        world.link_of = lambda name: settings.host(name).link_bps
        world.refresh()
