"""The real two-host libvirt harness as the bench scripts use it: prerequisites, guests, start-up, teardown.

``bench/libvirt_migration.py`` and ``bench/sim_fidelity.py`` (and probes built on them) run migrations on
``tests/libvirt_harness.hosts.TwoHosts``. :func:`bench_harness` is their one way in: it starts libvirt's event
loop (the engine's driver needs it before the first connection), silences libvirt's default error printer,
brings both hosts up, opens a connection to each, and warms each host up (the first QEMU start on a host
probes capabilities for seconds, which must not land in any measured run). On the way out it closes the
connections, tears the harness down (also on failure) and checks what is left behind; the caller reads that
verdict from :attr:`BenchHarness.teardown` after the ``with`` block::

    missing = missing_prerequisites()
    if missing:
        print(f"my_bench: skipped (needs {', '.join(missing)})")
        return 0
    with bench_harness("b-warmup") as harness:
        run(harness.hosts, harness.conns)
    print(f"teardown: {harness.torn_down().describe()}")

Only scripts import this: it needs root, libvirtd, QEMU and binutils at run time (checked by
:func:`missing_prerequisites`, which needs none of them), and imports libvirt lazily.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

COUNTER_WAIT_S = 20.0
NEEDED_BINARIES = ("libvirtd", "qemu-system-x86_64", "qemu-img", "as", "ld", "ip", "unshare", "nsenter")
# The warm-up guest: no memory or disk writes, the smallest disk; it only has to start once per host.
WARMUP_GUEST = {"mem_kib": 0, "disk_sectors": 0, "paced": True, "disk_mib": 8}


# --- prerequisites ------------------------------------------------------------------------------------------


def missing_prerequisites() -> list[str]:
    """What this machine lacks for the harness (root, binaries, libvirt-python); empty when it can run."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root")
    missing += [b for b in NEEDED_BINARIES if shutil.which(b) is None]
    try:
        import libvirt  # noqa: F401
    except ImportError:
        missing.append("libvirt-python (pip install -e '.[libvirt]')")
    return missing


# --- guest handling -----------------------------------------------------------------------------------------


def _counters(dom: Any) -> Any:
    from tests.libvirt_harness.guest import read_counters

    return read_counters(dom)


def counter_advances(dom: Any, passes: int = 3, wait_s: float = COUNTER_WAIT_S) -> bool:
    """Whether the guest's pass counter moves by ``passes`` within ``wait_s``: the guest runs."""
    import libvirt

    try:
        first = _counters(dom).passes
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if _counters(dom).passes >= first + passes:
                return True
            time.sleep(0.1)
    except (libvirt.libvirtError, RuntimeError):
        return False
    return False


def start_guest(host: Any, conn: Any, name: str, guest: Any) -> Any:
    """Build ``guest`` (a ``GuestSpec``) on ``host``, define and start it; raise unless it runs."""
    from tests.libvirt_harness.guest import build_disk, domain_xml

    image = host.image_path(f"{name}.qcow2")
    build_disk(guest, host.path(image))
    dom = conn.defineXML(domain_xml(name, image, guest))
    dom.create()
    if not counter_advances(dom):
        raise RuntimeError(f"guest {name} does not run on {host.name}")
    return dom


def remove_everywhere(hosts: Any, conns: dict[str, Any], name: str) -> None:
    """Destroy and undefine the domain ``name`` and delete its disk on every host, wherever they exist."""
    import libvirt

    for host in hosts.hosts:
        conn = conns[host.name]
        with contextlib.suppress(libvirt.libvirtError):
            dom = conn.lookupByName(name)
            with contextlib.suppress(libvirt.libvirtError):
                dom.destroy()
            with contextlib.suppress(libvirt.libvirtError):
                dom.undefine()
        with contextlib.suppress(FileNotFoundError):
            host.path(host.image_path(f"{name}.qcow2")).unlink()


def holds(host: Any, conn: Any, name: str) -> tuple[bool, bool]:
    """(domain defined, disk image present) on ``host``."""
    import libvirt

    try:
        conn.lookupByName(name)
        has_dom = True
    except libvirt.libvirtError:
        has_dom = False
    return has_dom, host.path(host.image_path(f"{name}.qcow2")).exists()


# --- teardown -----------------------------------------------------------------------------------------------


def namespace_pids(netns: list[str]) -> list[int]:
    """Every process in the harness's network namespaces (libvirtd, QEMU)."""
    pids: list[int] = []
    for ns in netns:
        out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=False).stdout
        pids += [int(p) for p in out.split() if p.isdigit()]
    return pids


def teardown_check(netns: list[str], root: Path | None, pids: list[int]) -> list[str]:
    """What the harness left behind: its namespaces, its directory, or a process that ran in them."""
    left = []
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    left += [ns for ns in netns if any(line.split()[:1] == [ns] for line in listed.splitlines())]
    if root is not None and root.exists():
        left.append(str(root))
    left += [f"pid {pid}" for pid in pids if Path(f"/proc/{pid}").exists()]
    return left


@dataclass(frozen=True)
class Teardown:
    """What tearing the harness down left behind, and how many processes it stopped."""

    left: list[str]
    pids: list[int]

    @property
    def clean(self) -> bool:
        return not self.left

    def describe(self) -> str:
        """``clean``, or ``LEFT`` and what was left (the scripts' teardown wording)."""
        return "clean" if self.clean else "LEFT " + ", ".join(self.left)


@dataclass
class BenchHarness:
    """The running harness: its hosts (a ``TwoHosts``), a connection to each by host name, and, once the
    ``with`` block has ended without an exception, the teardown verdict."""

    hosts: Any
    conns: dict[str, Any] = field(default_factory=dict)
    teardown: Teardown | None = None

    def torn_down(self) -> Teardown:
        """The teardown verdict; only after the ``with`` block ended (raises ``RuntimeError`` before)."""
        if self.teardown is None:
            raise RuntimeError("the bench harness has not been torn down yet")
        return self.teardown


@contextlib.contextmanager
def bench_harness(warmup_name: str) -> Iterator[BenchHarness]:
    """Bring the two-host harness up, connected and warmed up (a guest named ``warmup_name`` started and
    removed once on each host); tear it all down on the way out and set :attr:`BenchHarness.teardown`.

    The caller checks :func:`missing_prerequisites` first. An exception inside the block (or in start-up)
    still tears the harness down, and propagates; ``teardown`` is then not set.
    """
    import libvirt

    from host_engine.drivers import libvirt as driver_module
    from tests.libvirt_harness.guest import GuestSpec
    from tests.libvirt_harness.hosts import TwoHosts

    driver_module._EventLoop.ensure()  # libvirt's event loop must exist before the first connection
    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    with TwoHosts() as hosts:
        harness = BenchHarness(hosts)
        netns = [h.netns for h in hosts.hosts]
        root: Path = hosts.root
        pids: list[int] = []
        try:
            for h in hosts.hosts:
                harness.conns[h.name] = libvirt.open(h.uri)
            warm = GuestSpec(**WARMUP_GUEST)
            for host in hosts.hosts:
                start_guest(host, harness.conns[host.name], warmup_name, warm)
                remove_everywhere(hosts, harness.conns, warmup_name)
            yield harness
        finally:
            pids = namespace_pids(netns)
            for conn in harness.conns.values():
                with contextlib.suppress(libvirt.libvirtError):
                    conn.close()
    harness.teardown = Teardown(teardown_check(netns, root, pids), pids)
