"""Volumes and domains on a host, through libvirt's storage API: creating a migration's target disks,
deleting them (or a finished migration's source copies), removing a leftover domain.

Why the storage API and not ``qemu-img`` run on the target: the engine reaches a hypervisor only through its
libvirt URI (TLS or SSH in production), so anything that needs a shell on the target would be a second,
unaudited channel; libvirt runs ``qemu-img`` itself, with the daemon's own permissions and paths.
"""

from __future__ import annotations

import contextlib
import hashlib
import posixpath
from typing import Any

from host_engine.drivers.base import DriverError
from host_engine.drivers.libvirt.connection import libvirt_module, parse_xml
from host_engine.drivers.libvirt.disks import Disk

# Pools this driver creates on a host to manage volumes in a directory: transient, named after the directory.
POOL_PREFIX = "dlm-"


def pool_for(conn: Any, directory: str) -> Any:
    """A storage pool over ``directory``: an existing one, or a transient ``dir`` pool made for it."""
    lv = libvirt_module()
    for pool in conn.listAllStoragePools(0):
        target = parse_xml(pool.XMLDesc(0)).find("./target/path")
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


def create_volume(conn: Any, disk: Disk, host: str) -> None:
    """An empty volume at ``disk.path`` of the disk's format and capacity (the mirror fills it)."""
    lv = libvirt_module()
    pool = pool_for(conn, posixpath.dirname(disk.path))
    name = posixpath.basename(disk.path)
    xml = (
        f"<volume><name>{name}</name><capacity unit='bytes'>{disk.size_bytes}</capacity>"
        "<allocation unit='bytes'>0</allocation>"
        f"<target><format type='{disk.format}'/></target></volume>"
    )
    try:
        pool.createXML(xml, 0)
    except lv.libvirtError as e:
        raise DriverError(f"cannot create {disk.path} on {host}: {e}", target_at_fault=True) from e


def delete_volume(conn: Any, path: str) -> bool:
    """Delete the volume at ``path``; False when there is none."""
    lv = libvirt_module()
    pool = pool_for(conn, posixpath.dirname(path))
    with contextlib.suppress(lv.libvirtError):
        pool.refresh(0)
    try:
        vol = pool.storageVolLookupByName(posixpath.basename(path))
    except lv.libvirtError:
        return False
    vol.delete(0)
    return True


def volume_exists(conn: Any, path: str) -> bool:
    lv = libvirt_module()
    pool = pool_for(conn, posixpath.dirname(path))
    with contextlib.suppress(lv.libvirtError):
        pool.refresh(0)
    try:
        pool.storageVolLookupByName(posixpath.basename(path))
    except lv.libvirtError:
        return False
    return True


def destroy_and_undefine(dom: Any) -> None:
    """Stop ``dom`` if it runs and remove its definition (managed save and NVRAM too)."""
    lv = libvirt_module()
    with contextlib.suppress(lv.libvirtError):
        if dom.isActive():
            dom.destroy()
    try:
        dom.undefineFlags(lv.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | lv.VIR_DOMAIN_UNDEFINE_NVRAM)
    except lv.libvirtError:
        with contextlib.suppress(lv.libvirtError):  # a transient domain is gone once destroyed
            dom.undefine()
