"""Inventory: what runs where. ``host-engine inventory sync HOST`` reads the host's domains from libvirt.

The store is updated conservatively: new domains become droplets on the host, known droplets on the host get
their size and power state refreshed; a domain the store places on another host, or a droplet the store
places here that libvirt does not show, is reported and left alone (it may be mid-migration, or the store may
be wrong: an engineer decides).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from host_engine.drivers.base import DriverError
from host_engine.errors import InvalidInput, InventoryError
from host_engine.models import Droplet
from host_engine.store import Store

if TYPE_CHECKING:
    from host_engine.drivers.libvirt import DomainInfo

DROPLET_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")

DomainLister = Callable[[str], Sequence["DomainInfo"]]

# A host registered with a URI starting so is a simulated one (``host add --uri sim://NAME``).
SIM_URI_PREFIX = "sim:"


class DriverKind(enum.Enum):
    """Which hypervisor driver a host is driven by: it follows from the host, never from a flag."""

    SIM = "sim"
    LIBVIRT = "libvirt"


def driver_kind(uri: str) -> DriverKind | None:
    """``SIM`` for a host declared simulated (``sim:``/``sim://NAME``), ``LIBVIRT`` for any other URI
    (``qemu+tls://...``, ``test:///...``), None for a host registered without one."""
    if not uri.strip():
        return None
    return DriverKind.SIM if uri.strip().lower().startswith(SIM_URI_PREFIX) else DriverKind.LIBVIRT


def check_droplet_id(droplet_id: str) -> str:
    """Droplet ids are what the metadata server accepts: 1-64 of ``[A-Za-z0-9._-]``."""
    if not DROPLET_ID.fullmatch(droplet_id):
        raise InvalidInput(f"droplet id {droplet_id!r} must be 1-64 of A-Z a-z 0-9 . _ -", field="id")
    return droplet_id


def libvirt_lister(uri: str) -> Sequence[DomainInfo]:
    from host_engine.drivers.libvirt import list_domains  # libvirt itself is imported lazily in there

    return list_domains(uri)


@dataclass
class SyncReport:
    host: str
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    elsewhere: list[tuple[str, str]] = field(default_factory=list)  # (droplet, host the store says)
    missing: list[str] = field(default_factory=list)  # in the store on this host, not in libvirt
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (domain, why)

    def to_dict(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "added": self.added,
            "updated": self.updated,
            "unchanged": self.unchanged,
            "elsewhere": [{"droplet": d, "store_host": h} for d, h in self.elsewhere],
            "missing": self.missing,
            "skipped": [{"domain": d, "why": w} for d, w in self.skipped],
        }


def sync_host(
    store: Store, host_name: str, *, lister: DomainLister | None = None, dry_run: bool = False
) -> SyncReport:
    """Bring the store's droplets on ``host_name`` in line with the domains its hypervisor reports."""
    host = store.get_host(host_name)
    if not host.hypervisor_uri:
        raise InvalidInput(f"host {host_name} has no hypervisor URI (host add --uri)", field="uri")
    if driver_kind(host.hypervisor_uri) is DriverKind.SIM:
        raise InvalidInput(
            f"host {host_name} is simulated ({host.hypervisor_uri}): its droplets are the store's, "
            "nothing to read from a hypervisor",
            field="uri",
        )
    try:
        domains = list((lister or libvirt_lister)(host.hypervisor_uri))
    except DriverError as e:
        raise InventoryError(f"cannot read the domains of {host_name}: {e}") from e
    except ImportError as e:
        raise InventoryError(
            "libvirt-python is not installed (pip install 'droplet-live-migration[libvirt]')"
        ) from e
    report = SyncReport(host_name)
    with store.begin() as tx:
        seen = set()
        for dom in domains:
            if not DROPLET_ID.fullmatch(dom.name):
                report.skipped.append((dom.name, "name is not a valid droplet id"))
                continue
            seen.add(dom.name)
            disk_bytes = sum(d.size_bytes for d in dom.disks)
            power = dom.power_state.value
            try:
                known = tx.get_droplet(dom.name)
            except LookupError:
                known = None
            if known is None:
                tx.add_droplet(
                    Droplet(
                        id=dom.name,
                        host=host_name,
                        vcpus=dom.vcpus,
                        memory_bytes=dom.memory_bytes,
                        disk_bytes=disk_bytes,
                        hostname=dom.name,
                        power_state=power,
                    )
                )
                report.added.append(dom.name)
            elif known.host != host_name:
                report.elsewhere.append((dom.name, known.host))
            elif (known.vcpus, known.memory_bytes, known.disk_bytes, known.power_state) != (
                dom.vcpus,
                dom.memory_bytes,
                disk_bytes,
                power,
            ):
                tx.update_droplet(
                    dom.name,
                    vcpus=dom.vcpus,
                    memory_bytes=dom.memory_bytes,
                    disk_bytes=disk_bytes,
                    power_state=power,
                )
                report.updated.append(dom.name)
            else:
                report.unchanged.append(dom.name)
        report.missing = sorted(d.id for d in tx.list_droplets(host=host_name) if d.id not in seen)
        if dry_run:
            tx.conn.rollback()
    return report
