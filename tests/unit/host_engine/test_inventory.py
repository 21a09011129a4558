"""Inventory sync through libvirt's test driver (a node XML file: no daemon), and with a fake lister."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from host_engine.errors import InvalidInput, InventoryError
from host_engine.inventory import sync_host
from host_engine.store import Store
from tests.support import require
from tests.unit.host_engine.conftest import make_droplet, make_host

NODE = """<node>
{domains}
</node>"""
DOMAIN = """<domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>{mem}</memory>
  <vcpu>{vcpus}</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <source file='/var/lib/libvirt/images/{name}.img'/><target dev='vda' bus='virtio'/>
    </disk>
  </devices>
  {runstate}
</domain>"""


def node_file(tmp_path: Path, *domains: tuple[str, int, int, bool]) -> str:
    body = "\n".join(
        DOMAIN.format(
            name=n, mem=mem, vcpus=v, runstate="" if running else "<test:runstate>5</test:runstate>"
        )
        for n, mem, v, running in domains
    )
    path = tmp_path / "node.xml"
    path.write_text(NODE.format(domains=body))
    return f"test://{path}"


@pytest.fixture
def libvirt_available() -> None:
    require(
        importlib.util.find_spec("libvirt") is not None,
        "libvirt-python is not installed (pip install 'droplet-live-migration[libvirt]' with libvirt-dev)",
    )


@pytest.mark.usefixtures("libvirt_available")
def test_inventory_sync_reads_libvirt_test_driver(sqlite_store: Store, tmp_path: Path) -> None:
    uri = node_file(tmp_path, ("web1", 512, 1, True), ("db1", 2048, 4, False))
    sqlite_store.add_host(make_host("hv1", hypervisor_uri=uri))
    sqlite_store.add_host(make_host("hv2"))
    sqlite_store.add_droplet(make_droplet("gone", "hv1"))
    report = sync_host(sqlite_store, "hv1")
    assert sorted(report.added) == ["db1", "web1"]
    assert report.missing == ["gone"]
    web1 = sqlite_store.get_droplet("web1")
    assert (web1.host, web1.vcpus, web1.memory_bytes, web1.power_state) == (
        "hv1",
        1,
        512 * 1024**2,
        "running",
    )
    assert web1.disk_bytes > 0  # the test driver reports a constant block size
    assert sqlite_store.get_droplet("db1").power_state == "shut_off"
    # A second sync changes nothing.
    again = sync_host(sqlite_store, "hv1")
    assert again.added == [] and again.updated == [] and sorted(again.unchanged) == ["db1", "web1"]


@pytest.mark.usefixtures("libvirt_available")
def test_inventory_sync_unreachable_uri_is_one_error(sqlite_store: Store, tmp_path: Path) -> None:
    sqlite_store.add_host(make_host("hv1", hypervisor_uri=f"test://{tmp_path}/missing.xml"))
    with pytest.raises(InventoryError, match="cannot read the domains of hv1"):
        sync_host(sqlite_store, "hv1")
    assert sqlite_store.list_droplets() == []


def test_inventory_sync_conservative_with_fake_lister(sqlite_store: Store) -> None:
    from host_engine.drivers.libvirt import DiskInfo, DomainInfo, PowerState

    sqlite_store.add_host(make_host("hv1", hypervisor_uri="test:///x"))
    sqlite_store.add_host(make_host("hv2"))
    sqlite_store.add_droplet(make_droplet("moved", "hv2"))
    sqlite_store.add_droplet(make_droplet("web1", "hv1", vcpus=1))
    doms = [
        DomainInfo("web1", "u1", 2, 1024**3, (DiskInfo("vda", "/a", 10 * 1024**3),), PowerState.RUNNING),
        DomainInfo("moved", "u2", 1, 1024**3, (), PowerState.RUNNING),
        DomainInfo("bad/name", "u3", 1, 1024**3, (), PowerState.RUNNING),
    ]
    report = sync_host(sqlite_store, "hv1", lister=lambda uri: doms, dry_run=True)
    assert report.updated == ["web1"] and report.elsewhere == [("moved", "hv2")]
    assert report.skipped == [("bad/name", "name is not a valid droplet id")]
    assert sqlite_store.get_droplet("web1").vcpus == 1  # dry run
    sync_host(sqlite_store, "hv1", lister=lambda uri: doms)
    assert sqlite_store.get_droplet("web1").vcpus == 2
    assert sqlite_store.get_droplet("moved").host == "hv2"  # left alone


def test_inventory_sync_needs_uri(sqlite_store: Store) -> None:
    sqlite_store.add_host(make_host("hv1"))
    with pytest.raises(InvalidInput, match="no hypervisor URI"):
        sync_host(sqlite_store, "hv1", lister=lambda uri: [])


@pytest.mark.usefixtures("libvirt_available")
def test_inventory_sync_cli(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from host_engine.cli import Deps, cli

    uri = node_file(tmp_path, ("web1", 512, 1, True))
    db = str(tmp_path / "e.db")

    def run(*args: str) -> tuple[int, str, str]:
        r = CliRunner().invoke(
            cli, ["--db", db, *args], obj=Deps(install_signals=False), catch_exceptions=False
        )
        return r.exit_code, r.stdout, r.stderr

    assert run("host", "add", "hv1", "--datacenter", "d", "--vcpus", "4", "--memory", "8GiB", "--disk", "1TiB",
               "--uri", uri)[0] == 0  # fmt: skip
    code, out, _ = run("inventory", "sync", "hv1", "--dry-run")
    assert code == 0 and "would add 1" in out and "+ web1" in out
    assert run("droplet", "list", "--json")[1].strip() == "[]"
    code, out, _ = run("inventory", "sync", "hv1")
    assert code == 0 and "added 1" in out
    code, _, err = run("inventory", "sync", "nope")
    assert code == 3 and err.strip() == "host-engine: error: unknown host 'nope'"
    assert run("host", "add", "hv2", "--datacenter", "d", "--vcpus", "4", "--memory", "8GiB", "--disk", "1TiB",
               "--uri", f"test://{tmp_path}/missing.xml")[0] == 0  # fmt: skip
    code, _, err = run("inventory", "sync", "hv2")
    assert code == 8 and len(err.strip().splitlines()) == 1 and "cannot read the domains of hv2" in err
