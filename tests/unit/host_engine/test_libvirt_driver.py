"""The libvirt driver against libvirt's own test driver (``test:///ABS/node.xml``): no daemon, milliseconds.

Inventory, domain states and the target-side preparation (disks created through the storage API, leftovers
removed, clean-up on abort). The migration itself needs real daemons: tests/integration/test_libvirt_*.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support import require

MiB = 1024 * 1024

NODE = """<node>
  <domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>
    <name>web1</name>
    <uuid>11111111-2222-3333-4444-555555555555</uuid>
    <memory unit='MiB'>512</memory>
    <vcpu>2</vcpu>
    <os><type arch='x86_64'>hvm</type></os>
    <devices>
      <disk type='file' device='disk'>
        <driver name='qemu' type='qcow2'/>
        <source file='/var/lib/libvirt/images/web1.qcow2'/>
        <target dev='vda' bus='virtio'/>
      </disk>
      <disk type='file' device='cdrom'>
        <source file='/var/lib/libvirt/images/install.iso'/>
        <target dev='hdc' bus='ide'/>
        <readonly/>
      </disk>
    </devices>
  </domain>
  <domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>
    <name>db1</name>
    <memory unit='MiB'>1024</memory>
    <vcpu>4</vcpu>
    <os><type arch='x86_64'>hvm</type></os>
    <devices>
      <disk type='file' device='disk'>
        <source file='/var/lib/libvirt/images/db1.img'/>
        <target dev='vda' bus='virtio'/>
      </disk>
    </devices>
    <test:runstate>5</test:runstate>
  </domain>
  <domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>
    <name>cache1</name>
    <memory unit='MiB'>256</memory>
    <vcpu>1</vcpu>
    <os><type arch='x86_64'>hvm</type></os>
    <test:runstate>3</test:runstate>
  </domain>
</node>
"""

EMPTY_NODE = "<node></node>\n"


@pytest.fixture
def lv() -> Any:
    try:
        import libvirt
    except ImportError:
        require(False, "libvirt-python is not installed (pip install -e '.[libvirt]', needs libvirt-dev)")
    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    return libvirt


@pytest.fixture
def source_uri(tmp_path: Path, lv: Any) -> str:
    node = tmp_path / "source.xml"
    node.write_text(NODE)
    return f"test://{node}"


@pytest.fixture
def target_uri(tmp_path: Path, lv: Any) -> str:
    node = tmp_path / "target.xml"
    node.write_text(EMPTY_NODE)
    return f"test://{node}"


@pytest.fixture
def shared(lv: Any) -> Callable[[str], Any]:
    """One connection per URI, shared by the driver and the test (each open() of a node file is a new world)."""
    conns: dict[str, Any] = {}

    def open_connection(uri: str) -> Any:
        if uri not in conns:
            conns[uri] = lv.open(uri)
        return conns[uri]

    return open_connection


def spec(source_uri: str, target_uri: str, name: str = "web1", **kw: Any) -> Any:
    from host_engine.drivers.base import MigrationSpec

    return MigrationSpec(
        migration_id="m1",
        droplet_id=name,
        source_host="a",
        target_host="b",
        source_uri=source_uri,
        target_uri=target_uri,
        vcpus=2,
        memory_bytes=512 * MiB,
        disk_bytes=0,
        **kw,
    )


def test_libvirt_list_domains_reads_the_inventory(source_uri: str) -> None:
    from host_engine.drivers.libvirt import PowerState, list_domains

    domains = {d.name: d for d in list_domains(source_uri)}
    assert sorted(domains) == ["cache1", "db1", "web1"]
    web = domains["web1"]
    assert web.uuid == "11111111-2222-3333-4444-555555555555"
    assert (web.vcpus, web.memory_bytes, web.power_state) == (2, 512 * MiB, PowerState.RUNNING)
    # The read-only CD-ROM is not a disk to migrate or bill.
    [disk] = web.disks
    assert (disk.target, disk.path, disk.format) == ("vda", "/var/lib/libvirt/images/web1.qcow2", "qcow2")
    assert disk.size_bytes > 0  # the test driver reports a constant size
    assert domains["db1"].power_state is PowerState.SHUT_OFF
    assert domains["db1"].vcpus == 4
    assert domains["cache1"].power_state is PowerState.PAUSED
    assert domains["cache1"].disks == ()


def test_libvirt_list_domains_of_an_unreachable_uri_is_one_clear_error(tmp_path: Path, lv: Any) -> None:
    from host_engine.drivers.base import DriverError
    from host_engine.drivers.libvirt import list_domains

    with pytest.raises(DriverError, match="cannot connect"):
        list_domains(f"test://{tmp_path / 'missing.xml'}")


def test_libvirt_domain_state(source_uri: str) -> None:
    from host_engine.drivers.base import DomainState
    from host_engine.drivers.libvirt import LibvirtHypervisor

    hv = LibvirtHypervisor({"a": source_uri})
    assert hv.domain_state("a", "web1") is DomainState.RUNNING
    assert hv.domain_state("a", "cache1") is DomainState.PAUSED
    assert hv.domain_state("a", "db1") is DomainState.SHUT_OFF
    assert hv.domain_state("a", "nope") is DomainState.ABSENT


def test_libvirt_prepare_target_creates_the_disks_then_abort_removes_them(
    source_uri: str, target_uri: str, shared: Callable[[str], Any]
) -> None:
    from host_engine.drivers.base import Phase
    from host_engine.drivers.libvirt import LibvirtMigration

    mig = LibvirtMigration(spec(source_uri, target_uri), open_connection=shared)
    mig.prepare_target()
    source_dom = shared(source_uri).lookupByName("web1")
    capacity = source_dom.blockInfo("/var/lib/libvirt/images/web1.qcow2")[0]
    vol = shared(target_uri).storageVolLookupByPath("/var/lib/libvirt/images/web1.qcow2")
    assert vol.info()[1] == capacity
    assert mig.progress().phase is Phase.PREPARING

    mig.abort()
    assert mig.progress().phase is Phase.FAILED
    with pytest.raises(lv_error()):
        shared(target_uri).storageVolLookupByPath("/var/lib/libvirt/images/web1.qcow2")
    assert source_dom.isActive()  # the source is left running


def test_libvirt_prepare_target_refuses_a_path_another_target_domain_uses(
    source_uri: str, target_uri: str, shared: Callable[[str], Any]
) -> None:
    from host_engine.drivers.base import DriverError
    from host_engine.drivers.libvirt import LibvirtMigration

    other = """<domain type='test'><name>other</name><memory unit='MiB'>64</memory>
      <os><type arch='x86_64'>hvm</type></os><devices><disk type='file' device='disk'>
      <source file='/var/lib/libvirt/images/web1.qcow2'/><target dev='vda' bus='virtio'/></disk></devices></domain>"""
    shared(target_uri).defineXML(other)
    mig = LibvirtMigration(spec(source_uri, target_uri), open_connection=shared)
    with pytest.raises(DriverError, match="uses") as e:
        mig.prepare_target()
    assert e.value.target_at_fault
    mig.finalize(False)  # nothing of "other" is touched
    assert shared(target_uri).lookupByName("other").name() == "other"


def test_libvirt_prepare_target_removes_a_leftover_of_an_earlier_attempt(
    source_uri: str, target_uri: str, shared: Callable[[str], Any]
) -> None:
    from host_engine.drivers.libvirt import LibvirtMigration

    source_xml = shared(source_uri).lookupByName("web1").XMLDesc(0)
    leftover = shared(target_uri).defineXML(source_xml)  # an earlier attempt's target copy, never started
    assert not leftover.isActive()
    mig = LibvirtMigration(spec(source_uri, target_uri), open_connection=shared)
    mig.prepare_target()
    assert "web1" not in [d.name() for d in shared(target_uri).listAllDomains(0)]


def test_libvirt_prepare_target_never_removes_a_running_target_copy(
    source_uri: str, target_uri: str, shared: Callable[[str], Any]
) -> None:
    from host_engine.drivers.base import DriverError
    from host_engine.drivers.libvirt import LibvirtMigration

    source = shared(source_uri).lookupByName("web1")
    target_copy = shared(target_uri).defineXML(source.XMLDesc(0))
    target_copy.create()
    source.suspend()  # as after a switchover whose confirmation never came
    mig = LibvirtMigration(spec(source_uri, target_uri), open_connection=shared)
    with pytest.raises(DriverError, match="recover"):
        mig.prepare_target()
    assert target_copy.isActive()


def test_libvirt_live_spec_for_a_shut_off_domain_asks_for_offline(
    source_uri: str, target_uri: str, shared: Callable[[str], Any]
) -> None:
    from host_engine.drivers.base import DriverError
    from host_engine.drivers.libvirt import LibvirtMigration

    with pytest.raises(DriverError, match="offline"):
        LibvirtMigration(spec(source_uri, target_uri, "db1"), open_connection=shared).prepare_target()
    with pytest.raises(DriverError, match="not an offline"):
        LibvirtMigration(spec(source_uri, target_uri, offline=True), open_connection=shared).prepare_target()


def test_libvirt_migration_options_are_checked(source_uri: str, target_uri: str) -> None:
    from host_engine.drivers.base import DriverError, MigrationDriver
    from host_engine.drivers.libvirt import LibvirtHypervisor, LibvirtMigration

    with pytest.raises(DriverError, match="auto_converge"):
        LibvirtMigration(spec(source_uri, target_uri, options={"auto_converge": "sometimes"}))
    with pytest.raises(DriverError, match=r"options\.tls"):
        LibvirtMigration(spec(source_uri, target_uri, options={"tls": "yes"}))
    with pytest.raises(DriverError, match=r"options\.sync_writes must be 0 or 1"):
        LibvirtMigration(spec(source_uri, target_uri, options={"sync_writes": "true"}))
    for bad in ("four", "-1", "256"):
        with pytest.raises(DriverError, match=r"options\.parallel_connections"):
            LibvirtMigration(spec(source_uri, target_uri, options={"parallel_connections": bad}))
    hv = LibvirtHypervisor({"a": source_uri, "b": target_uri}, options={"bandwidth_mibps": "64"})
    mig = hv.migration(spec(source_uri, target_uri, options={"paused": "1"}))
    assert isinstance(mig, MigrationDriver)
    assert (mig.bandwidth_mibps, mig.target_paused) == (64, True)
    assert mig.peer_uri == target_uri  # by default the daemons use the engine's URI
    hv = LibvirtHypervisor({"a": source_uri, "b": target_uri}, peer_uris={"b": "qemu+tls://b.example/system"})
    assert hv.migration(spec(source_uri, target_uri)).peer_uri == "qemu+tls://b.example/system"
    with pytest.raises(DriverError, match="no libvirt URI"):
        hv.domain_state("c", "web1")


def lv_error() -> type[Exception]:
    import libvirt

    return libvirt.libvirtError  # type: ignore[no-any-return]


def test_libvirt_recover_before_switchover_keeps_the_source_and_cleans_the_target(
    source_uri: str, target_uri: str, shared: Callable[[str], Any]
) -> None:
    from host_engine.drivers.libvirt import LibvirtHypervisor

    hv = LibvirtHypervisor({"a": source_uri, "b": target_uri}, open_connection=shared)
    source = shared(source_uri).lookupByName("web1")
    hv.migration(spec(source_uri, target_uri)).prepare_target()  # the dead worker's attempt: disks made
    leftover = shared(target_uri).defineXML(source.XMLDesc(0))
    source.suspend()  # paused mid-migration when the worker died
    assert hv.recover(spec(source_uri, target_uri)).host == "a"
    assert source.state()[0] == 1  # running again
    assert [d.name() for d in shared(target_uri).listAllDomains(0)] == []
    with pytest.raises(lv_error()):
        shared(target_uri).storageVolLookupByPath("/var/lib/libvirt/images/web1.qcow2")
    del leftover
    assert hv.recover(spec(source_uri, target_uri)).host == "a"  # idempotent


def test_libvirt_recover_after_switchover_keeps_the_target(
    source_uri: str, target_uri: str, shared: Callable[[str], Any]
) -> None:
    from host_engine.drivers.libvirt import LibvirtHypervisor

    hv = LibvirtHypervisor({"a": source_uri, "b": target_uri}, open_connection=shared)
    source = shared(source_uri).lookupByName("web1")
    target_copy = shared(target_uri).defineXML(source.XMLDesc(0))
    target_copy.create()
    source.suspend()  # switchover done, the source's confirmation never came
    assert hv.recover(spec(source_uri, target_uri)).host == "b"
    assert "web1" not in [d.name() for d in shared(source_uri).listAllDomains(0)]
    assert target_copy.isActive()
    assert hv.recover(spec(source_uri, target_uri)).host == "b"  # idempotent


def test_libvirt_config_reaches_migrate_to_uri3(
    source_uri: str, target_uri: str, shared: Callable[[str], Any], lv: Any
) -> None:
    """[libvirt] bandwidth_mibps / tls / peer_uris and [controller] max_downtime_ms, as the engine builds the
    hypervisor (host_engine.engine_steps.executor_step): the params, flags and peer URI migrateToURI3 gets."""
    from host_engine.config import config_from_dict
    from host_engine.drivers.libvirt import LibvirtHypervisor

    config = config_from_dict(
        {
            "controller": {"max_downtime_ms": 120},
            "libvirt": {
                "bandwidth_mibps": 100,
                "tls": True,
                "peer_uris": {"b": "qemu+tls://b.migration.example/system"},
            },
        }
    )
    hv = LibvirtHypervisor(
        {"a": source_uri, "b": target_uri},
        peer_uris=config.libvirt.peer_uris,
        options=config.libvirt.options(),
        open_connection=shared,
    )
    calls: list[tuple[str, dict[str, Any], int]] = []
    downtimes: list[int] = []

    def started() -> tuple[str, dict[str, Any], int]:
        mig = hv.migration(spec(source_uri, target_uri))
        mig.prepare_target()
        # The test driver gives no device aliases (QEMU does): name them as QEMU would.
        mig._disks = [dataclasses.replace(d, alias=f"virtio-disk{i}") for i, d in enumerate(mig._disks)]
        dom = mig._dom

        def migrate(uri: str, params: dict[str, Any], flags: int) -> None:
            calls.append((uri, dict(params), flags))
            raise lv.libvirtError("recorded, not migrated")  # the test driver cannot migrate

        dom.migrateToURI3 = migrate
        dom.migrateSetMaxDowntime = lambda ms, _flags: downtimes.append(ms)
        mig.set_max_downtime(config.controller.max_downtime_ms)  # what MigrationRun.begin does
        mig.start()
        mig._thread.join(5)
        mig.finalize(False)  # the target's disks go again
        return calls[-1]

    uri, params, flags = started()
    assert uri == "qemu+tls://b.migration.example/system"
    assert params[lv.VIR_MIGRATE_PARAM_BANDWIDTH] == 100
    assert flags & lv.VIR_MIGRATE_TLS
    base = lv.VIR_MIGRATE_LIVE | lv.VIR_MIGRATE_PEER2PEER | lv.VIR_MIGRATE_NON_SHARED_DISK
    assert flags & base == base
    assert downtimes == [120]

    # The defaults: no cap (no bandwidth parameter), no TLS, the engine's own URI for the peer.
    hv = LibvirtHypervisor({"a": source_uri, "b": target_uri}, open_connection=shared)
    config = config_from_dict({})
    uri, params, flags = started()
    assert uri == target_uri
    assert lv.VIR_MIGRATE_PARAM_BANDWIDTH not in params
    assert not flags & lv.VIR_MIGRATE_TLS
    assert config.controller.max_downtime_ms == 300 and downtimes[-1] == 300
    # The engine's transport by default: the write-blocking disk mirror and memory over 4 connections.
    assert flags & lv.VIR_MIGRATE_NON_SHARED_SYNCHRONOUS_WRITES
    assert flags & lv.VIR_MIGRATE_PARALLEL and params[lv.VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS] == 4

    # Turned off in [libvirt]: libvirt's own background mirror and one connection.
    config = config_from_dict({"libvirt": {"sync_disk_writes": False, "parallel_connections": 0}})
    hv = LibvirtHypervisor(
        {"a": source_uri, "b": target_uri}, options=config.libvirt.options(), open_connection=shared
    )
    uri, params, flags = started()
    assert not flags & (lv.VIR_MIGRATE_NON_SHARED_SYNCHRONOUS_WRITES | lv.VIR_MIGRATE_PARALLEL)
    assert lv.VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS not in params


def test_libvirt_progress_has_no_disk_dirty_rate_under_the_write_blocking_mirror(
    source_uri: str, target_uri: str
) -> None:
    """A guest writing its disk fast while the mirror copies: with libvirt's background mirror its writes
    are blocks to copy again (the controller may limit them); with the write-blocking mirror (the default)
    each write is copied as it happens, so nothing is dirtied and no limit is called for."""
    from host_engine.controller import ControllerConfig
    from host_engine.controller_disk import disk_write_limit
    from host_engine.drivers.base import Phase
    from host_engine.drivers.libvirt import LibvirtMigration

    stats = {"disk_total": 64 * MiB, "disk_processed": 60 * MiB, "disk_remaining": 4 * MiB}

    def progress_of(**options: str) -> Any:
        mig = LibvirtMigration(spec(source_uri, target_uri, options=options))
        now = [0.0]
        written = iter([0, 40 * MiB]).__next__  # the guest writes 10 MiB/s
        mig._clock = lambda: now[0]
        mig._started_at = 0.0
        mig._phase = Phase.DISK
        mig._disk_written_bytes = written  # type: ignore[method-assign]
        mig._progress_from({**stats, "data_processed": 20 * MiB})
        now[0] = 4.0
        return mig._progress_from({**stats, "data_processed": 40 * MiB})

    background = progress_of(sync_writes="0")
    assert background.disk_dirty_rate_bps == pytest.approx(10 * MiB)
    assert disk_write_limit(background, ControllerConfig()) is not None
    blocking = progress_of()
    assert blocking.disk_dirty_rate_bps == 0.0
    assert disk_write_limit(blocking, ControllerConfig()) is None
