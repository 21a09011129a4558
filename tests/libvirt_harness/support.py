"""Fixtures and helpers shared by the real-libvirt test modules (tests/integration/test_libvirt_*.py).

One two-host harness serves the whole session, whichever modules use it: ``hosts`` is a session fixture
that every module imports from here, and the harness behind it is made once per process and torn down when
the last module's fixture ends (two harnesses at once would clash: their network namespaces share a name).
Needs root, libvirtd, QEMU and binutils: skipped locally without them, failed under CI=true.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import require, require_binary, require_root

MiB = 1024 * 1024
TICK_S = 0.25
COUNTER_WAIT_S = 20.0


def _require_libvirt() -> None:
    require_root("real libvirt daemons in network namespaces")
    for binary in ("libvirtd", "qemu-system-x86_64", "qemu-img", "as", "ld", "ip", "unshare", "nsenter"):
        require_binary(binary)
    try:
        import libvirt  # noqa: F401
    except ImportError:
        require(False, "libvirt-python is not installed (pip install -e '.[libvirt]')")


class _Shared:
    """The process's one harness and how many session fixtures (one per module) use it."""

    harness: Any = None
    users = 0


@pytest.fixture(scope="session")
def hosts() -> Iterator[Any]:
    _require_libvirt()
    from tests.libvirt_harness.hosts import TwoHosts

    if _Shared.harness is None:
        _Shared.harness = TwoHosts().__enter__()
    _Shared.users += 1
    try:
        yield _Shared.harness
    finally:
        _Shared.users -= 1
        if _Shared.users == 0:
            harness, _Shared.harness = _Shared.harness, None
            harness.close()


@pytest.fixture(scope="session")
def conns(hosts: Any) -> Iterator[Any]:
    from host_engine.drivers import libvirt as driver_module

    driver_module._EventLoop.ensure()
    conns = Conns(hosts)
    yield conns
    conns.close()


class Conns:
    """The test's own connections to both hosts (reopened when a test restarts a daemon)."""

    def __init__(self, hosts: Any) -> None:
        self.hosts = hosts
        self._src: Any = None
        self._dst: Any = None

    @staticmethod
    def _fresh(conn: Any, uri: str) -> Any:
        import libvirt

        libvirt.registerErrorHandler(lambda _c, _e: None, None)
        if conn is not None:
            try:
                conn.getLibVersion()
                return conn
            except libvirt.libvirtError:
                pass
        return libvirt.open(uri)

    @property
    def src(self) -> Any:
        self._src = self._fresh(self._src, self.hosts.source.uri)
        return self._src

    @property
    def dst(self) -> Any:
        self._dst = self._fresh(self._dst, self.hosts.target.uri)
        return self._dst

    def close(self) -> None:
        import libvirt

        for conn in (self._src, self._dst):
            if conn is not None:
                with contextlib.suppress(libvirt.libvirtError):
                    conn.close()


# --- helpers -----------------------------------------------------------------------------------------------


def start_guest(hosts: Any, conns: Conns, name: str, guest: Any) -> Any:
    """Build ``guest`` into a disk on the source, define and start it, wait until its counter moves."""
    from tests.libvirt_harness.guest import build_disk, domain_xml

    image = hosts.source.image_path(f"{name}.qcow2")
    build_disk(guest, hosts.source.path(image))
    dom = conns.src.defineXML(domain_xml(name, image, guest))
    dom.create()
    wait_counter_advances(dom)
    return dom


def wait_counter_advances(dom: Any, *, passes: int = 3) -> int:
    """Wait until the guest's pass counter advanced by ``passes``: it runs. Returns the last value."""
    from tests.libvirt_harness.guest import read_counters

    first = read_counters(dom).passes
    deadline = time.monotonic() + COUNTER_WAIT_S
    while time.monotonic() < deadline:
        now = read_counters(dom)
        if now.passes >= first + passes:
            assert now.disk_errors == 0
            return now.passes
        time.sleep(0.1)
    raise AssertionError(f"guest counter stuck at {first}")


def spec_for(
    hosts: Any, name: str, *, offline: bool = False, power_on_after: bool = True, **options: str
) -> Any:
    from host_engine.drivers.base import MigrationSpec

    return MigrationSpec(
        migration_id=f"m-{name}-{uuid.uuid4().hex[:6]}",
        droplet_id=name,
        source_host=hosts.source.name,
        target_host=hosts.target.name,
        source_uri=hosts.source.uri,
        target_uri=hosts.target.uri,
        vcpus=1,
        memory_bytes=128 * MiB,
        disk_bytes=64 * MiB,
        offline=offline,
        power_on_after=power_on_after,
        options={"peer_uri": hosts.target.peer_uri, **options},
    )


def run(driver: Any, config: Any = None, **kwargs: Any) -> Any:
    from host_engine.attempt import RealClock, run_migration
    from host_engine.controller import ControllerConfig

    return run_migration(driver, config or ControllerConfig(), RealClock(), tick_s=TICK_S, **kwargs)


def qmp(dom: Any, command: str, **arguments: Any) -> Any:
    import libvirt_qemu

    request = {"execute": command, **({"arguments": arguments} if arguments else {})}
    return json.loads(libvirt_qemu.qemuMonitorCommand(dom, json.dumps(request), 0))["return"]


def write_limits(dom: Any) -> dict[str, int]:
    """QEMU's I/O limits in force, per disk device (``query-block``): bytes/s written, 0 = none."""
    return {
        b.get("qdev", b["device"]): b["inserted"]["bps_wr"] + b["inserted"]["bps"]
        for b in qmp(dom, "query-block")
        if "inserted" in b
    }


def write_limits_in_force(dom: Any) -> list[int]:
    """The non-zero write limits on ``dom``'s disks now; none once the domain has gone (it just switched over)."""
    import libvirt

    with contextlib.suppress(libvirt.libvirtError):
        return [v for v in write_limits(dom).values() if v]
    return []


def domain_names(conn: Any) -> list[str]:
    return sorted(d.name() for d in conn.listAllDomains(0))


def running(dom: Any) -> bool:
    import libvirt

    return dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING


def stable_xml(dom: Any) -> str:
    """The domain's definition, minus what changes every run (ids)."""
    import libvirt

    return dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)


def images(host: Any) -> list[str]:
    return sorted(p.name for p in host.path("/var/lib/libvirt/images").iterdir())


def wait_for_phase(driver: Any, *phases: str, timeout_s: float = 90.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        p = driver.progress()
        if p.phase.value in phases:
            return p
        if p.phase.value in ("done", "failed"):
            raise AssertionError(f"migration ended ({p.phase.value}: {p.error}) before {phases}")
        time.sleep(TICK_S)
    raise AssertionError(f"no phase {phases} within {timeout_s} s")


PLAIN_LOG_OUTPUTS = "3:file:/var/log/libvirt/libvirtd.log"  # the harness's libvirtd.conf


def virt_admin(host: Any, *args: str) -> None:
    """``virt-admin`` against ``host``'s daemon (its admin socket in the harness's directory)."""
    sock = host.root / "run" / "libvirt-admin-sock"
    subprocess.run(
        ["virt-admin", "-c", f"libvirtd:///system?socket={sock}", *args],
        check=True,
        capture_output=True,
        timeout=10,
    )


@contextlib.contextmanager
def monitor_log(host: Any, name: str) -> Iterator[Path]:
    """While the block runs, ``host``'s daemon logs its QEMU-monitor traffic (what libvirt hands QEMU) to
    ``name`` in its log directory; yields that file as this process sees it (read it after the block)."""
    log_file = host.root / "log" / name
    log_file.unlink(missing_ok=True)
    virt_admin(host, "daemon-log-filters", "1:qemu.qemu_monitor")
    virt_admin(host, "daemon-log-outputs", f"1:file:/var/log/libvirt/{name} {PLAIN_LOG_OUTPUTS}")
    try:
        yield log_file
    finally:
        virt_admin(host, "daemon-log-filters", "")
        virt_admin(host, "daemon-log-outputs", PLAIN_LOG_OUTPUTS)
