"""Workload models: how a simulated droplet dirties its disk and memory (rate, hot set, random/sequential).

Every model is a plain ``Workload`` value, so it round-trips through JSON (the sim's store rows keep it).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

MiB = 1024 * 1024
GiB = 1024 * MiB

# 10 Gbit/s: a common hypervisor uplink; the real veth measured 100-230 MB/s, a TCG-bound figure.
DEFAULT_NIC_BPS = 1_250_000_000


class Pattern(enum.Enum):
    """Where and when a workload's writes land in its hot set.

    - ``RANDOM``: spread over the hot set, all the time;
    - ``SEQUENTIAL``: a sweep through the hot set, all the time;
    - ``PERIODIC``: the whole hot set at once, ``rate / hot`` times a second, and nothing in between: a
      timer-driven job (the libvirt harness's guests rewrite theirs once per BIOS tick, 18.2 times a second,
      each pass taking about a millisecond). QEMU can switch such a guest over between two bursts with a
      hot set larger than its downtime limit allows, which a guest writing all the time never lets it do.
    """

    RANDOM = "random"
    SEQUENTIAL = "sequential"
    PERIODIC = "periodic"


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
    # How much of the droplet holds data: RAM the guest ever wrote (the rest is zero pages, which QEMU
    # skips), disk clusters allocated (the mirror copies only those). None: all of it (the cautious figure).
    memory_resident_bytes: int | None = None
    disk_allocated_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["disk_pattern"] = self.disk_pattern.value
        d["memory_pattern"] = self.memory_pattern.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Workload:
        """The inverse of ``to_dict``; rows written before a field existed get its default."""
        return cls(
            **{
                "memory_resident_bytes": None,
                "disk_allocated_bytes": None,
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
