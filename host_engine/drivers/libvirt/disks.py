"""A domain's disks as its XML and the host's storage describe them."""

from __future__ import annotations

import contextlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any

from host_engine.drivers.base import DriverError
from host_engine.drivers.libvirt.connection import libvirt_module, parse_xml

# libvirt iotune element → QMP block_set_io_throttle argument.
IOTUNE_TO_QMP = {
    "total_bytes_sec": "bps",
    "read_bytes_sec": "bps_rd",
    "write_bytes_sec": "bps_wr",
    "total_iops_sec": "iops",
    "read_iops_sec": "iops_rd",
    "write_iops_sec": "iops_wr",
}


@dataclass
class Disk:
    """One disk a migration moves: where it lives, its size, QEMU's alias for it, its own I/O limits."""

    target: str
    path: str
    format: str
    size_bytes: int
    alias: str
    iotune: dict[str, int] = field(default_factory=dict)


def domain_disks(dom: Any, *, inactive: bool = False) -> list[tuple[str, str, str, ET.Element]]:
    """(target dev, source path, format, <disk> element) of each file/block disk that holds data."""
    lv = libvirt_module()
    flags = lv.VIR_DOMAIN_XML_INACTIVE if inactive else 0
    out = []
    for disk in parse_xml(dom.XMLDesc(flags)).findall("./devices/disk"):
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


def disk_size(dom: Any, path: str) -> int:
    """A disk's virtual size: from its storage volume when a pool holds it, else from ``blockInfo``."""
    lv = libvirt_module()
    with contextlib.suppress(lv.libvirtError):
        return int(dom.connect().storageVolLookupByPath(path).info()[1])
    try:
        capacity, _allocation, _physical = dom.blockInfo(path)
    except lv.libvirtError as e:
        raise DriverError(f"cannot read the size of {path}: {e}") from e
    return int(capacity)


def read_disks(dom: Any, *, sized: bool) -> list[Disk]:
    """Every data disk of ``dom`` with its alias and ``<iotune>`` limits; sizes read only when ``sized``."""
    out = []
    for dev, path, fmt, elem in domain_disks(dom):
        alias_el, iotune_el = elem.find("alias"), elem.find("iotune")
        iotune = {}
        if iotune_el is not None:
            iotune = {c.tag: int(c.text) for c in iotune_el if c.tag in IOTUNE_TO_QMP and c.text}
        alias = alias_el.get("name", "") if alias_el is not None else ""
        out.append(Disk(dev, path, fmt, disk_size(dom, path) if sized else 0, alias, iotune))
    return out


def device_alias(dom: Any, target: str) -> str:
    """The alias the running domain gives disk ``target`` (QEMU's device id)."""
    for dev, _path, _fmt, elem in domain_disks(dom):
        alias = elem.find("alias")
        if dev == target and alias is not None:
            return str(alias.get("name", ""))
    raise DriverError(f"disk {target} has no device alias in the running domain")
