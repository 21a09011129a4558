"""What a host holds, for ``host-engine inventory sync``: its domains, their size, disks and power state.

The network side (interfaces, filters, known addresses) is :mod:`host_engine.drivers.libvirt.network`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from host_engine.drivers.base import DriverError
from host_engine.drivers.libvirt.connection import libvirt_module, open_uri
from host_engine.drivers.libvirt.disks import disk_size, domain_disks
from host_engine.states import PowerState


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


def power_state(lv: Any, state: int) -> PowerState:
    """libvirt's domain state number as a :class:`PowerState`."""
    if state in (lv.VIR_DOMAIN_RUNNING, lv.VIR_DOMAIN_BLOCKED):
        return PowerState.RUNNING
    if state == lv.VIR_DOMAIN_PAUSED:
        return PowerState.PAUSED
    if state in (lv.VIR_DOMAIN_SHUTOFF, lv.VIR_DOMAIN_SHUTDOWN, lv.VIR_DOMAIN_CRASHED):
        return PowerState.SHUT_OFF
    return PowerState.OTHER


def list_domains(uri: str) -> list[DomainInfo]:
    """Every domain defined or running at ``uri``, with vCPUs, memory, disks and power state."""
    lv = libvirt_module()
    conn = open_uri(uri)
    try:
        result = []
        for dom in conn.listAllDomains(0):
            state, _max_kib, mem_kib, vcpus, _cpu = dom.info()
            disks = tuple(
                DiskInfo(target=dev, path=path, size_bytes=disk_size(dom, path), format=fmt)
                for dev, path, fmt, _ in domain_disks(dom)
            )
            result.append(
                DomainInfo(
                    name=dom.name(),
                    uuid=dom.UUIDString(),
                    vcpus=int(vcpus),
                    memory_bytes=int(dom.maxMemory() or mem_kib) * 1024,
                    disks=disks,
                    power_state=power_state(lv, state),
                )
            )
        return sorted(result, key=lambda d: d.name)
    except lv.libvirtError as e:
        raise DriverError(f"inventory of {uri} failed: {e}") from e
    finally:
        conn.close()
