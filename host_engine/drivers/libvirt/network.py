"""The network side of libvirt domains, for ``host-engine inventory sync``: each domain's interfaces, the
nwfilter guarding each one, and the addresses libvirt knows for it.

Why the engine reads this at all: the metadata server tells droplets apart by the TCP source address of their
requests, which is only sound when a droplet cannot send with another droplet's address. On a
libvirt hypervisor that guarantee is an nwfilter on every interface: ``clean-traffic`` (or
``clean-traffic-gateway``, or a filter of the operator's that references one of them) with an ``IP`` parameter
fixing the address the guest may use. :class:`InterfaceInfo` carries what is needed to check that; the policy
(what counts as a gap) lives in :mod:`host_engine.inventory`.

Addresses libvirt knows, by where they come from (:class:`AddressSource`): the ``IP`` parameters of an
interface's filter (what the hypervisor enforces), a libvirt network's DHCP lease, and the host's neighbour
(ARP) table matched by the interface's MAC. The last two exist only while the domain runs.

``libvirt`` is imported lazily through :mod:`host_engine.drivers.libvirt.connection` (the only module
importing it), so nothing else needs libvirt-python installed.
"""

from __future__ import annotations

import enum
import ipaddress
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from host_engine.drivers.base import DriverError
from host_engine.drivers.libvirt.connection import libvirt_module, open_uri, parse_xml

log = logging.getLogger(__name__)

# libvirt's own anti-spoofing filters (shipped by libvirt-daemon-config-nwfilter).
CLEAN_TRAFFIC_FILTERS = frozenset({"clean-traffic", "clean-traffic-gateway"})
# The filter parameters that fix a guest's addresses (``IP`` for IPv4; ``IPV6`` for filters that take one).
IP_PARAMETERS = frozenset({"IP", "IPV6"})
# Filters reference filters; a longer chain than this (or a loop) is not followed.
MAX_FILTER_DEPTH = 16


class AddressSource(enum.Enum):
    """Where libvirt's knowledge of an address comes from, most trusted first (see ``SOURCE_ORDER``)."""

    NWFILTER = "nwfilter"  # the IP parameter of the interface's filter: the address the hypervisor enforces
    LEASE = "lease"  # a libvirt network's DHCP lease for the interface's MAC
    ARP = (
        "arp"  # the hypervisor's neighbour table: what the guest answered ARP with (it can lie if unfiltered)
    )


SOURCE_ORDER = (AddressSource.NWFILTER, AddressSource.LEASE, AddressSource.ARP)


@dataclass(frozen=True)
class FilterRef:
    """An interface's ``<filterref>``: the filter's name, its parameters, and whether it is (or references)
    one of libvirt's clean-traffic filters on this host."""

    name: str
    parameters: tuple[tuple[str, str], ...]
    clean_traffic: bool

    @property
    def ip_addresses(self) -> tuple[str, ...]:
        """The addresses the ``IP``/``IPV6`` parameters fix, normalised (non-addresses dropped)."""
        out = []
        for key, value in self.parameters:
            if key.upper() in IP_PARAMETERS:
                address = normalise_address(value)
                if address is not None:
                    out.append(address)
        return tuple(out)


@dataclass(frozen=True)
class InterfaceInfo:
    """One ``<interface>`` of a domain."""

    mac: str
    kind: str  # the interface's type: bridge, network, direct, ethernet, hostdev, ...
    target: str  # the host-side device (tap) while the domain runs, else ""
    filter: FilterRef | None


@dataclass(frozen=True)
class DomainNetwork:
    """A domain's interfaces and the addresses libvirt knows for it, per source (empty ones omitted)."""

    name: str
    interfaces: tuple[InterfaceInfo, ...]
    known: tuple[tuple[AddressSource, tuple[str, ...]], ...] = ()
    # Sources libvirt failed to read for this running domain, with its error (e.g. libvirt 9.0 cannot parse
    # the neighbour table of Linux >= 6.x: "wrong nlmsg len"): an operator must know why nothing was found.
    unreadable: tuple[tuple[AddressSource, str], ...] = ()

    def addresses(self, source: AddressSource) -> tuple[str, ...]:
        return dict(self.known).get(source, ())

    def best_known(self) -> tuple[AddressSource, tuple[str, ...]] | None:
        """The addresses of the most trusted source that has any (``SOURCE_ORDER``), or None."""
        for source in SOURCE_ORDER:
            found = self.addresses(source)
            if found:
                return source, found
        return None


def normalise_address(value: str) -> str | None:
    """``value`` as the store writes addresses (``ipaddress``'s form), or None if it is not one."""
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        return None


def read_networks(uri: str) -> dict[str, DomainNetwork]:
    """Every domain at ``uri`` (by name): its interfaces, their filters, the addresses libvirt knows."""
    lv = libvirt_module()
    conn = open_uri(uri)
    try:
        resolver = _FilterResolver(conn)
        return {dom.name(): domain_network(dom, resolver) for dom in conn.listAllDomains(0)}
    except lv.libvirtError as e:
        raise DriverError(f"reading the interfaces of {uri}'s domains failed: {e}") from e
    finally:
        conn.close()


def domain_network(dom: Any, resolver: _FilterResolver) -> DomainNetwork:
    """One domain's :class:`DomainNetwork` (its live definition when it runs, else its persistent one)."""
    interfaces = tuple(
        _interface(el, resolver) for el in parse_xml(dom.XMLDesc(0)).findall("./devices/interface")
    )
    known: dict[AddressSource, list[str]] = {}
    for iface in interfaces:
        if iface.filter is not None:
            known.setdefault(AddressSource.NWFILTER, []).extend(iface.filter.ip_addresses)
    macs = {i.mac for i in interfaces}
    unreadable: dict[AddressSource, str] = {}
    if dom.isActive() and interfaces:
        found_by_source, unreadable = _interface_addresses(dom, macs)
        for source, found in found_by_source.items():
            known.setdefault(source, []).extend(found)
    return DomainNetwork(
        name=dom.name(),
        interfaces=interfaces,
        known=tuple(
            (source, tuple(dict.fromkeys(known[source]))) for source in SOURCE_ORDER if known.get(source)
        ),
        unreadable=tuple(unreadable.items()),
    )


def _interface(el: Any, resolver: _FilterResolver) -> InterfaceInfo:
    mac_el, target_el, ref_el = el.find("mac"), el.find("target"), el.find("filterref")
    ref = None
    if ref_el is not None and ref_el.get("filter"):
        name = ref_el.get("filter", "")
        params = tuple(
            (p.get("name", ""), p.get("value", "")) for p in ref_el.findall("parameter") if p.get("name")
        )
        ref = FilterRef(name=name, parameters=params, clean_traffic=resolver.is_clean_traffic(name))
    return InterfaceInfo(
        mac=(mac_el.get("address", "") if mac_el is not None else "").lower(),
        kind=el.get("type", ""),
        target=target_el.get("dev", "") if target_el is not None else "",
        filter=ref,
    )


def _interface_addresses(
    dom: Any, macs: set[str]
) -> tuple[dict[AddressSource, list[str]], dict[AddressSource, str]]:
    """Addresses from the DHCP leases and the neighbour table, for this domain's own MACs only; and the
    sources libvirt could not read, with its error."""
    lv = libvirt_module()
    sources = {
        AddressSource.LEASE: lv.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE,
        AddressSource.ARP: lv.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_ARP,
    }
    out: dict[AddressSource, list[str]] = {}
    errors: dict[AddressSource, str] = {}
    for source, flag in sources.items():
        try:
            answer: Mapping[str, Any] = dom.interfaceAddresses(flag) or {}
        except lv.libvirtError as e:
            if e.get_error_code() != lv.VIR_ERR_OPERATION_INVALID:  # not "domain is not running" (it stopped)
                errors[source] = str(e)
            log.info("domain %s: no %s addresses: %s", dom.name(), source.value, e)
            continue
        for entry in answer.values():
            if str(entry.get("hwaddr", "")).lower() not in macs:
                continue
            for addr in entry.get("addrs") or ():
                address = normalise_address(str(addr.get("addr", "")))
                if address is not None:
                    out.setdefault(source, []).append(address)
    return out, errors


class _FilterResolver:
    """Whether a filter is one of libvirt's clean-traffic filters or references one (directly or through
    other filters), looked up once per name on the host's libvirt."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._cache: dict[str, bool] = {}

    def is_clean_traffic(self, name: str) -> bool:
        if name not in self._cache:
            self._cache[name] = self._resolve(name, depth=0, seen=frozenset())
        return self._cache[name]

    def _resolve(self, name: str, *, depth: int, seen: frozenset[str]) -> bool:
        if name in CLEAN_TRAFFIC_FILTERS:
            return True
        if depth >= MAX_FILTER_DEPTH or name in seen:
            return False
        lv = libvirt_module()
        try:
            xml = self._conn.nwfilterLookupByName(name).XMLDesc(0)
        except lv.libvirtError as e:
            # Unknown to this host (a domain using it could not start) or no nwfilter driver: not a guard.
            log.info("nwfilter %s: cannot read it: %s", name, e)
            return False
        refs = [r.get("filter", "") for r in parse_xml(xml).findall("filterref")]
        return any(self._resolve(r, depth=depth + 1, seen=seen | {name}) for r in refs if r)
