"""Inventory: what runs where. ``host-engine inventory sync HOST`` reads the host's domains from libvirt.

The store is updated conservatively: new domains become droplets on the host, known droplets on the host get
their size and power state refreshed; a domain the store places on another host, or a droplet the store
places here that libvirt does not show, is reported and left alone (it may be mid-migration, or the store may
be wrong: an engineer decides).

Addresses and anti-spoofing (issues 11.6 and 15.2). A droplet with no recorded address can never be told of a
maintenance (the metadata server knows a droplet only by its address), so sync fills an empty address list
from what libvirt knows, most trusted source first (``libvirt.network.SOURCE_ORDER``: the interface filter's
``IP`` parameter, a DHCP lease, the neighbour table) and says which source it used. An address the operator
recorded is never replaced: a difference is reported. An address already recorded for another droplet is never
filled in (two droplets with one address would read each other's events); it is reported.
Because the metadata server trusts the source address, sync reports every droplet on the host that could send
with another's address: an interface without a clean-traffic-family nwfilter, a clean-traffic filter with no
``IP`` parameter, or a recorded address that no such filter fixes.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from host_engine.drivers.base import DriverError
from host_engine.errors import InvalidInput, InventoryError
from host_engine.models import Droplet
from host_engine.store import Store

if TYPE_CHECKING:
    from host_engine.drivers.libvirt import DomainInfo
    from host_engine.drivers.libvirt.network import AddressSource, DomainNetwork

DROPLET_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")

DomainLister = Callable[[str], Sequence["DomainInfo"]]
# uri -> domain name -> its interfaces, filters and known addresses (drivers/libvirt/network.py).
NetworkReader = Callable[[str], Mapping[str, "DomainNetwork"]]

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


def libvirt_network_reader(uri: str) -> Mapping[str, DomainNetwork]:
    from host_engine.drivers.libvirt.network import read_networks  # lazily, like libvirt_lister

    return read_networks(uri)


@dataclass(frozen=True)
class FilledAddresses:
    """Addresses sync recorded for a droplet that had none, and where libvirt knew them from."""

    droplet: str
    addresses: tuple[str, ...]
    source: str  # an AddressSource value: nwfilter | lease | arp


@dataclass(frozen=True)
class AddressDifference:
    """The operator's recorded addresses differ from what libvirt knows: reported, never overwritten."""

    droplet: str
    recorded: tuple[str, ...]
    known: tuple[str, ...]
    source: str


@dataclass(frozen=True)
class AddressConflict:
    """An address libvirt knows for ``droplet`` is already recorded for another droplet, or libvirt knows it
    for others too (``recorded_for`` names them): not filled in."""

    droplet: str
    address: str
    recorded_for: str


@dataclass(frozen=True)
class SpoofingGap:
    """A droplet that can send with another droplet's address, and why (one sentence per problem)."""

    droplet: str
    problems: tuple[str, ...]


@dataclass
class SyncReport:
    host: str
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    elsewhere: list[tuple[str, str]] = field(default_factory=list)  # (droplet, host the store says)
    missing: list[str] = field(default_factory=list)  # in the store on this host, not in libvirt
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (domain, why)
    # Whether interfaces were read at all (a caller-supplied lister without a network reader reads none).
    network_checked: bool = False
    filled: list[FilledAddresses] = field(default_factory=list)
    differences: list[AddressDifference] = field(default_factory=list)
    conflicts: list[AddressConflict] = field(default_factory=list)
    spoofable: list[SpoofingGap] = field(default_factory=list)
    unaddressed: list[str] = field(default_factory=list)  # still no address: can never be notified
    # (source, libvirt's error) for address sources libvirt failed to read on this host, once each.
    source_errors: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "added": self.added,
            "updated": self.updated,
            "unchanged": self.unchanged,
            "elsewhere": [{"droplet": d, "store_host": h} for d, h in self.elsewhere],
            "missing": self.missing,
            "skipped": [{"domain": d, "why": w} for d, w in self.skipped],
            "network_checked": self.network_checked,
            "addresses_filled": [
                {"droplet": f.droplet, "addresses": list(f.addresses), "source": f.source}
                for f in self.filled
            ],
            "addresses_differ": [
                {
                    "droplet": d.droplet,
                    "recorded": list(d.recorded),
                    "libvirt": list(d.known),
                    "source": d.source,
                }
                for d in self.differences
            ],
            "address_conflicts": [
                {"droplet": c.droplet, "address": c.address, "recorded_for": c.recorded_for}
                for c in self.conflicts
            ],
            "spoofable": [{"droplet": g.droplet, "problems": list(g.problems)} for g in self.spoofable],
            "unaddressed": self.unaddressed,
            "address_source_errors": [{"source": s, "error": e} for s, e in self.source_errors],
        }


def sync_host(
    store: Store,
    host_name: str,
    *,
    lister: DomainLister | None = None,
    network: NetworkReader | None = None,
    dry_run: bool = False,
) -> SyncReport:
    """Bring the store's droplets on ``host_name`` in line with the domains its hypervisor reports.

    ``network`` reads the domains' interfaces (default: from libvirt, unless a ``lister`` of the caller's is
    given without one: then no interface is read and ``report.network_checked`` is False)."""
    host = store.get_host(host_name)
    if not host.hypervisor_uri:
        raise InvalidInput(f"host {host_name} has no hypervisor URI (host add --uri)", field="uri")
    if driver_kind(host.hypervisor_uri) is DriverKind.SIM:
        raise InvalidInput(
            f"host {host_name} is simulated ({host.hypervisor_uri}): its droplets are the store's, "
            "nothing to read from a hypervisor",
            field="uri",
        )
    reader = network if network is not None else (libvirt_network_reader if lister is None else None)
    domains, networks = _read(host_name, host.hypervisor_uri, lister or libvirt_lister, reader)
    report = SyncReport(host_name, network_checked=reader is not None)
    with store.begin() as tx:
        seen = set()
        # Droplets libvirt shows here and the store places here: their recorded addresses.
        here: dict[str, tuple[str, ...]] = {}
        for dom in domains:
            if not DROPLET_ID.fullmatch(dom.name):
                report.skipped.append((dom.name, "name is not a valid droplet id"))
                continue
            seen.add(dom.name)
            disk_bytes = sum(d.size_bytes for d in dom.disks)
            power = dom.power_state
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
                here[dom.name] = ()
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
                here[dom.name] = known.addresses
            else:
                report.unchanged.append(dom.name)
                here[dom.name] = known.addresses
        if report.network_checked:
            _check_addresses(tx, report, here, networks)
        report.missing = sorted(d.id for d in tx.list_droplets(host=host_name) if d.id not in seen)
        if dry_run:
            tx.conn.rollback()
    return report


def _read(
    host_name: str, uri: str, lister: DomainLister, reader: NetworkReader | None
) -> tuple[list[DomainInfo], Mapping[str, DomainNetwork]]:
    try:
        return list(lister(uri)), (reader(uri) if reader is not None else {})
    except DriverError as e:
        raise InventoryError(f"cannot read the domains of {host_name}: {e}") from e
    except ImportError as e:
        raise InventoryError(
            "libvirt-python is not installed (pip install 'droplet-live-migration[libvirt]')"
        ) from e


def _check_addresses(
    tx: Any, report: SyncReport, here: Mapping[str, tuple[str, ...]], networks: Mapping[str, DomainNetwork]
) -> None:
    """Fill empty address lists from libvirt, report differences and conflicts, then the spoofing gaps.

    An address libvirt knows for two droplets that both lack one (an unfiltered guest answering ARP for a
    neighbour's address) goes to neither: whichever came first could be the impostor."""
    owners = {a: d.id for d in tx.list_droplets() for a in d.addresses}
    best = {d: n.best_known() for d, n in networks.items() if d in here}
    claims: dict[str, set[str]] = {}
    for droplet_id, known in best.items():
        if known is not None and not here[droplet_id]:
            for address in known[1]:
                claims.setdefault(address, set()).add(droplet_id)
    for droplet_id in sorted(here):
        recorded = here[droplet_id]
        known = best.get(droplet_id)
        if known is not None and not recorded:
            recorded = _fill(tx, report, droplet_id, known, owners, claims)
        elif known is not None and set(known[1]) != set(recorded):
            report.differences.append(AddressDifference(droplet_id, recorded, known[1], known[0].value))
        if not recorded:
            report.unaddressed.append(droplet_id)
        net = networks.get(droplet_id)
        if net is not None:
            for source, error in net.unreadable:
                if (source.value, error) not in report.source_errors:
                    report.source_errors.append((source.value, error))
            problems = spoofing_problems(net, recorded)
            if problems:
                report.spoofable.append(SpoofingGap(droplet_id, problems))


def _fill(
    tx: Any,
    report: SyncReport,
    droplet_id: str,
    known: tuple[AddressSource, tuple[str, ...]],
    owners: dict[str, str],
    claims: Mapping[str, set[str]],
) -> tuple[str, ...]:
    """Record the addresses libvirt knows for a droplet that has none, except conflicting ones."""
    source, found = known
    fill = []
    for address in found:
        owner = owners.get(address)
        rivals = sorted(claims.get(address, set()) - {droplet_id})
        if owner is not None and owner != droplet_id:
            report.conflicts.append(AddressConflict(droplet_id, address, owner))
        elif rivals:
            report.conflicts.append(AddressConflict(droplet_id, address, ", ".join(rivals)))
        else:
            fill.append(address)
    if fill:
        tx.update_droplet(droplet_id, addresses=tuple(fill))
        owners.update(dict.fromkeys(fill, droplet_id))
        report.filled.append(FilledAddresses(droplet_id, tuple(fill), source.value))
    return tuple(fill)


def spoofing_problems(net: DomainNetwork, addresses: Sequence[str]) -> tuple[str, ...]:
    """Why a domain could send with another droplet's address (empty: it cannot, as far as libvirt shows).

    Every interface needs a clean-traffic-family filter with an ``IP`` parameter, and each recorded address
    must be fixed by such a filter; a domain with no interface cannot send at all."""
    problems = []
    guarded: set[str] = set()
    for iface in net.interfaces:
        label = f"interface {iface.mac or '(no MAC)'}"
        ref = iface.filter
        if ref is None:
            problems.append(f"{label} has no nwfilter, so it can send with any address")
        elif not ref.clean_traffic:
            problems.append(f"{label}'s nwfilter {ref.name} is not clean-traffic and references none")
        elif not ref.ip_addresses:
            problems.append(
                f"{label}'s nwfilter {ref.name} has no IP parameter "
                "(libvirt would lock it to whatever address the guest uses first)"
            )
        else:
            guarded.update(ref.ip_addresses)
    if guarded:
        problems.extend(
            f"address {a} is not the IP parameter of a clean-traffic filter on any of its interfaces"
            for a in addresses
            if a not in guarded
        )
    return tuple(problems)
