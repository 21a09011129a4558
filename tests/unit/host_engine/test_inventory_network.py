"""``inventory sync`` and the domains' network side (issues 11.6 and 15.2), through libvirt's test driver.

The test driver (a node XML file, no daemon) reports interfaces, their ``<filterref>`` and, for a running
domain on a libvirt network, a DHCP lease / neighbour address of its own; it has no nwfilter driver, so filter
*references* (a filter of the operator's that includes clean-traffic) are proven on the real daemons in
tests/integration/test_libvirt_inventory.py.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import json
from pathlib import Path

import pytest

from host_engine.drivers.libvirt.network import (
    AddressSource,
    DomainNetwork,
    FilterRef,
    InterfaceInfo,
)
from host_engine.inventory import spoofing_problems, sync_host
from host_engine.store import Store
from tests.support import require
from tests.unit.host_engine.conftest import make_droplet, make_host

NETWORK = """<network><name>default</name><bridge name='virbr0'/>
  <ip address='192.168.122.1' netmask='255.255.255.0'>
    <dhcp><range start='192.168.122.2' end='192.168.122.254'/></dhcp>
  </ip></network>"""
DOMAIN = """<domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>
  <name>{name}</name><memory unit='MiB'>512</memory><vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>{interfaces}</devices>
  {runstate}
</domain>"""
ON_NETWORK = "<interface type='network'><mac address='{mac}'/><source network='default'/>{filter}</interface>"
CLEAN = "<filterref filter='{name}'>{params}</filterref>"
PARAM = "<parameter name='{key}' value='{value}'/>"


def filterref(name: str = "clean-traffic", **params: str) -> str:
    return CLEAN.format(name=name, params="".join(PARAM.format(key=k, value=v) for k, v in params.items()))


def node(tmp_path: Path, *domains: tuple[str, bool, list[tuple[str, str]]]) -> str:
    """A node file with the ``default`` network and ``(name, running, [(mac, filterref xml)])`` domains."""
    body = "\n".join(
        DOMAIN.format(
            name=name,
            interfaces="".join(ON_NETWORK.format(mac=mac, filter=f) for mac, f in ifaces),
            runstate="" if running else "<test:runstate>5</test:runstate>",
        )
        for name, running, ifaces in domains
    )
    path = tmp_path / "node.xml"
    path.write_text(f"<node>{body}{NETWORK}</node>")
    return f"test://{path}"


@pytest.fixture(autouse=True)
def libvirt_available() -> None:
    require(
        importlib.util.find_spec("libvirt") is not None,
        "libvirt-python is not installed (pip install 'droplet-live-migration[libvirt]' with libvirt-dev)",
    )


def lease_of(uri: str, name: str) -> list[str]:
    """What libvirt itself answers for the domain's DHCP lease (``virsh domifaddr --source lease``)."""
    import libvirt

    dom = libvirt.open(uri).lookupByName(name)
    answer = dom.interfaceAddresses(libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE)
    return [a["addr"] for entry in answer.values() for a in entry["addrs"]]


def test_sync_fills_empty_addresses_from_libvirt_and_labels_the_source(
    sqlite_store: Store, tmp_path: Path
) -> None:
    uri = node(
        tmp_path,
        ("leased", True, [("52:54:00:00:00:01", "")]),
        ("guarded", False, [("52:54:00:00:00:02", filterref(IP="10.20.0.7"))]),
    )
    sqlite_store.add_host(make_host("hv1", hypervisor_uri=uri))
    report = sync_host(sqlite_store, "hv1")
    [lease] = lease_of(uri, "leased")
    assert ipaddress.ip_address(lease) in ipaddress.ip_network("192.168.122.0/24")
    filled = {f.droplet: (f.addresses, f.source) for f in report.filled}
    assert filled == {"leased": ((lease,), "lease"), "guarded": (("10.20.0.7",), "nwfilter")}
    assert sqlite_store.get_droplet("leased").addresses == (lease,)
    assert sqlite_store.get_droplet("guarded").addresses == ("10.20.0.7",)
    assert report.unaddressed == []
    # The filtered droplet is safe; the other can send with any address.
    assert [g.droplet for g in report.spoofable] == ["leased"]
    [problem] = report.spoofable[0].problems
    assert "52:54:00:00:00:01 has no nwfilter" in problem
    # A second sync has nothing to fill and nothing differs.
    again = sync_host(sqlite_store, "hv1")
    assert again.filled == [] and again.differences == []


def test_sync_never_overwrites_an_operator_address_and_says_so(sqlite_store: Store, tmp_path: Path) -> None:
    uri = node(tmp_path, ("web1", False, [("52:54:00:00:00:02", filterref(IP="10.20.0.7"))]))
    sqlite_store.add_host(make_host("hv1", hypervisor_uri=uri))
    sqlite_store.add_droplet(make_droplet("web1", "hv1", addresses=("10.20.0.9",)))
    report = sync_host(sqlite_store, "hv1")
    assert sqlite_store.get_droplet("web1").addresses == ("10.20.0.9",)
    assert report.filled == []
    [diff] = report.differences
    assert (diff.droplet, diff.recorded, diff.known, diff.source) == (
        "web1",
        ("10.20.0.9",),
        ("10.20.0.7",),
        "nwfilter",
    )
    # The recorded address is not the one the filter lets it use: the metadata server's identity is unsound.
    [gap] = report.spoofable
    assert gap.problems == (
        "address 10.20.0.9 is not the IP parameter of a clean-traffic filter on any of its interfaces",
    )


def test_sync_does_not_fill_an_address_recorded_for_another_droplet(
    sqlite_store: Store, tmp_path: Path
) -> None:
    uri = node(tmp_path, ("web1", False, [("52:54:00:00:00:02", filterref(IP="10.20.0.7"))]))
    sqlite_store.add_host(make_host("hv1", hypervisor_uri=uri))
    sqlite_store.add_host(make_host("hv2"))
    sqlite_store.add_droplet(make_droplet("other", "hv2", addresses=("10.20.0.7",)))
    report = sync_host(sqlite_store, "hv1")
    assert sqlite_store.get_droplet("web1").addresses == ()
    assert [(c.droplet, c.address, c.recorded_for) for c in report.conflicts] == [
        ("web1", "10.20.0.7", "other")
    ]
    assert report.unaddressed == ["web1"]


def test_dry_run_records_no_address(sqlite_store: Store, tmp_path: Path) -> None:
    uri = node(tmp_path, ("web1", False, [("52:54:00:00:00:02", filterref(IP="10.20.0.7"))]))
    sqlite_store.add_host(make_host("hv1", hypervisor_uri=uri))
    sqlite_store.add_droplet(make_droplet("web1", "hv1", addresses=()))
    report = sync_host(sqlite_store, "hv1", dry_run=True)
    assert [f.droplet for f in report.filled] == ["web1"]
    assert sqlite_store.get_droplet("web1").addresses == ()


def _net(*interfaces: InterfaceInfo) -> DomainNetwork:
    return DomainNetwork("d", interfaces)


def _iface(mac: str, ref: FilterRef | None) -> InterfaceInfo:
    return InterfaceInfo(mac=mac, kind="bridge", target="", filter=ref)


@pytest.mark.parametrize(
    ("net", "addresses", "expected"),
    [
        # Guarded: clean-traffic (or -gateway) with the recorded address.
        (_net(_iface("m1", FilterRef("clean-traffic", (("IP", "10.0.0.5"),), True))), ["10.0.0.5"], ()),
        (_net(_iface("m1", FilterRef("mine", (("IP", "10.0.0.5"),), True))), ["10.0.0.5"], ()),
        # No interface: it cannot send at all.
        (_net(), ["10.0.0.5"], ()),
        (
            _net(_iface("m1", FilterRef("allow-all", (("IP", "10.0.0.5"),), False))),
            ["10.0.0.5"],
            ("interface m1's nwfilter allow-all is not clean-traffic and references none",),
        ),
        (
            _net(_iface("m1", FilterRef("clean-traffic", (), True))),
            [],
            (
                "interface m1's nwfilter clean-traffic has no IP parameter (libvirt would lock it to "
                "whatever address the guest uses first)",
            ),
        ),
        # One interface guarded, a second one open: the open one is the hole.
        (
            _net(
                _iface("m1", FilterRef("clean-traffic", (("IP", "10.0.0.5"),), True)),
                _iface("m2", None),
            ),
            ["10.0.0.5", "10.0.0.6"],
            (
                "interface m2 has no nwfilter, so it can send with any address",
                "address 10.0.0.6 is not the IP parameter of a clean-traffic filter on any of its interfaces",
            ),
        ),
    ],
)
def test_spoofing_problems(net: DomainNetwork, addresses: list[str], expected: tuple[str, ...]) -> None:
    assert spoofing_problems(net, addresses) == expected


def test_filter_ip_values_are_normalised_and_best_source_is_the_filter() -> None:
    ref = FilterRef("clean-traffic", (("IP", " 10.0.0.5 "), ("IPV6", "2001:DB8::1"), ("IP", "nope")), True)
    assert ref.ip_addresses == ("10.0.0.5", "2001:db8::1")
    net = DomainNetwork(
        "d",
        (),
        ((AddressSource.NWFILTER, ("10.0.0.5",)), (AddressSource.ARP, ("10.0.0.6",))),
    )
    assert net.best_known() == (AddressSource.NWFILTER, ("10.0.0.5",))
    assert DomainNetwork("d", ()).best_known() is None


def test_sync_cli_prints_one_warning_per_spoofable_droplet_and_json_field(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from host_engine.cli import Deps, cli

    uri = node(
        tmp_path,
        ("open1", False, [("52:54:00:00:00:01", ""), ("52:54:00:00:00:03", "")]),
        ("guarded", False, [("52:54:00:00:00:02", filterref(IP="10.20.0.7"))]),
    )
    db = str(tmp_path / "e.db")

    def run(*args: str) -> tuple[int, str]:
        r = CliRunner().invoke(
            cli, ["--db", db, *args], obj=Deps(install_signals=False), catch_exceptions=False
        )
        return r.exit_code, r.stdout

    assert run("host", "add", "hv1", "--datacenter", "d", "--vcpus", "4", "--memory", "8GiB", "--disk", "1TiB",
               "--uri", uri)[0] == 0  # fmt: skip
    code, out = run("inventory", "sync", "hv1", "--dry-run", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["network_checked"] is True
    assert doc["spoofable"] == [
        {
            "droplet": "open1",
            "problems": [
                "interface 52:54:00:00:00:01 has no nwfilter, so it can send with any address",
                "interface 52:54:00:00:00:03 has no nwfilter, so it can send with any address",
            ],
        }
    ]
    assert doc["addresses_filled"] == [
        {"droplet": "guarded", "addresses": ["10.20.0.7"], "source": "nwfilter"}
    ]
    assert doc["unaddressed"] == ["open1"]
    code, out = run("inventory", "sync", "hv1")
    assert code == 0
    warnings = [line for line in out.splitlines() if "WARNING" in line]
    assert warnings == [
        "  WARNING open1: can send with another droplet's address: interface 52:54:00:00:00:01 has no "
        "nwfilter, so it can send with any address; interface 52:54:00:00:00:03 has no nwfilter, so it can "
        "send with any address"
    ]
    assert "  @ guarded: recorded address 10.20.0.7 (from libvirt's nwfilter)" in out
    assert "  ! open1: no address known, so it can never be notified (droplet set --address)" in out
    assert json.loads(run("droplet", "show", "guarded", "--json")[1])["addresses"] == ["10.20.0.7"]


def _open_domain(name: str, mac: str, arp: tuple[str, ...] = ()) -> DomainNetwork:
    known = ((AddressSource.ARP, arp),) if arp else ()
    return DomainNetwork(name, (InterfaceInfo(mac, "bridge", "vnet0", None),), known)


def test_an_address_libvirt_knows_for_two_droplets_goes_to_neither(
    sqlite_store: Store, tmp_path: Path
) -> None:
    """An unfiltered guest answering ARP for its neighbour's address must not win the neighbour's identity."""
    uri = node(tmp_path, ("victim", True, []), ("spoofer", True, []))
    sqlite_store.add_host(make_host("hv1", hypervisor_uri=uri))
    nets = {
        "victim": _open_domain("victim", "52:54:00:00:00:01", ("10.20.0.5",)),
        "spoofer": _open_domain("spoofer", "52:54:00:00:00:02", ("10.20.0.5", "10.20.0.6")),
    }
    report = sync_host(sqlite_store, "hv1", network=lambda uri: nets)
    assert sqlite_store.get_droplet("victim").addresses == ()
    assert sqlite_store.get_droplet("spoofer").addresses == ("10.20.0.6",)
    assert sorted((c.droplet, c.address, c.recorded_for) for c in report.conflicts) == [
        ("spoofer", "10.20.0.5", "victim"),
        ("victim", "10.20.0.5", "spoofer"),
    ]
    assert report.unaddressed == ["victim"]


def test_a_source_libvirt_cannot_read_is_reported_once(sqlite_store: Store, tmp_path: Path) -> None:
    """(The CLI line for it is checked on the real harness, where libvirt 9.0's ARP source fails.)"""
    uri = node(tmp_path, ("a1", True, []), ("a2", True, []))
    error = "internal error: wrong nlmsg len"
    nets = {
        n: DomainNetwork(
            n, (InterfaceInfo(f"52:54:00:00:00:0{i}", "bridge", "", None),), (), ((AddressSource.ARP, error),)
        )
        for i, n in enumerate(("a1", "a2"))
    }
    sqlite_store.add_host(make_host("hv1", hypervisor_uri=uri))
    report = sync_host(sqlite_store, "hv1", network=lambda uri: nets)
    assert report.to_dict()["address_source_errors"] == [{"source": "arp", "error": error}]
    assert report.unaddressed == ["a1", "a2"]
