"""Two real libvirt "hosts" on one machine, for the migration integration tests.

Each host is a ``libvirtd`` in its own network namespace and its own private mount namespace, where
``/etc/libvirt``, ``/run/libvirt``, ``/var/lib/libvirt``, ``/var/cache/libvirt`` and ``/var/log/libvirt`` are
bind-mounted from the host's directory under a temporary root. The two namespaces are joined by a veth pair
(10.99.0.1/24 ↔ 10.99.0.2/24): addresses that exist only inside the namespaces made here. Guests run under TCG,
so no /dev/kvm is needed. The engine (the test) connects from outside through each daemon's UNIX socket; the
daemons reach each other over the veth for peer-to-peer migration.

Everything started here is torn down by :meth:`TwoHosts.close` (every process in the two network
namespaces is killed, the namespaces deleted, the directories removed), which the fixtures call even when
a test fails. The machine must have a ``libvirt-qemu`` system user: libvirt's QEMU driver will not start
without one, even with ``user="root"`` in qemu.conf. A migration that copies storage needs the target disk
to exist first (the libvirt driver creates it through the target's storage API).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

SUBNET_PREFIX = "10.99.0"
LIBVIRTD_READY_TIMEOUT_S = 20.0
LIBVIRTD_STOP_TIMEOUT_S = 10.0
COMMAND_TIMEOUT_S = 30.0
# Directories each host gets privately: (path inside the host, sub-directory of the host's root).
PRIVATE_DIRS = (
    ("/etc/libvirt", "etc"),
    ("/run/libvirt", "run"),
    ("/var/lib/libvirt", "lib"),
    ("/var/cache/libvirt", "cache"),
    ("/var/log/libvirt", "log"),
)
IMAGES_DIR = "/var/lib/libvirt/images"


class HarnessError(RuntimeError):
    """The two-host harness could not be set up or driven."""


def _run(argv: list[str], *, check: bool = True, timeout_s: float = COMMAND_TIMEOUT_S) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
    if check and proc.returncode != 0:
        raise HarnessError(f"{shlex.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


@dataclass
class LibvirtHost:
    """One libvirt host: its namespaces, its directories and its daemon."""

    name: str
    netns: str
    ip: str
    root: Path
    host_uuid: str = field(default_factory=lambda: str(uuid.uuid4()))
    process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        """How the engine (outside the namespaces) connects to this host."""
        return f"qemu+unix:///system?socket={self.root / 'run' / 'libvirt-sock'}"

    @property
    def peer_uri(self) -> str:
        """How the other host's libvirtd connects to this one (peer-to-peer migration)."""
        return f"qemu+tcp://{self.ip}/system"

    def path(self, inside: str) -> Path:
        """The outside path of a file the host sees at ``inside`` (one of its private directories)."""
        for mount_point, sub in PRIVATE_DIRS:
            if inside == mount_point or inside.startswith(mount_point + "/"):
                return self.root / sub / inside[len(mount_point) :].lstrip("/")
        raise HarnessError(f"{inside} is not in one of {self.name}'s private directories")

    def image_path(self, file_name: str) -> str:
        """Where a disk image lives, as the host (and its domains' XML) sees it."""
        return f"{IMAGES_DIR}/{file_name}"

    def write_config(self) -> None:
        for _, sub in PRIVATE_DIRS:
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.path(IMAGES_DIR).mkdir(parents=True, exist_ok=True)
        (self.root / "etc" / "libvirtd.conf").write_text(
            "listen_tls = 0\n"
            "listen_tcp = 1\n"
            f'listen_addr = "{self.ip}"\n'
            'auth_tcp = "none"\n'
            'auth_unix_rw = "none"\n'
            'auth_unix_ro = "none"\n'
            f'host_uuid = "{self.host_uuid}"\n'
            "log_level = 3\n"
            'log_outputs = "3:file:/var/log/libvirt/libvirtd.log"\n'
        )
        (self.root / "etc" / "qemu.conf").write_text(
            'user = "root"\n'
            'group = "root"\n'
            "dynamic_ownership = 0\n"
            'security_driver = "none"\n'
            'stdio_handler = "file"\n'
            f'migration_address = "{self.ip}"\n'
            f'migration_host = "{self.ip}"\n'
        )

    def start(self) -> None:
        """Start (or restart) the host's libvirtd and wait until it answers."""
        if self.process is not None and self.process.poll() is None:
            raise HarnessError(f"{self.name}: libvirtd already runs")
        sock = self.root / "run" / "libvirt-sock"
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
        mounts = " && ".join(
            f"mount --bind {shlex.quote(str(self.root / sub))} {mount_point}"
            for mount_point, sub in PRIVATE_DIRS
        )
        points = " ".join(mount_point for mount_point, _ in PRIVATE_DIRS)
        script = (
            f"mkdir -p {points} && {mounts} && exec libvirtd --listen --pid-file /run/libvirt/libvirtd.pid"
        )
        stderr = (self.root / "log" / "libvirtd.stderr").open("ab")
        try:
            self.process = subprocess.Popen(
                [*self._enter_namespaces(), "sh", "-c", script],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                start_new_session=True,
            )
        finally:
            stderr.close()
        self._wait_ready(sock)

    def _enter_namespaces(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns, "unshare", "--mount", "--propagation", "private"]

    def _wait_ready(self, sock: Path) -> None:
        import libvirt

        deadline = time.monotonic() + LIBVIRTD_READY_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise HarnessError(
                    f"{self.name}: libvirtd exited {self.process.returncode}: {self.log_tail()}"
                )
            if sock.exists():
                try:
                    conn = libvirt.open(self.uri)
                except libvirt.libvirtError:
                    pass
                else:
                    conn.close()
                    return
            time.sleep(0.05)
        raise HarnessError(f"{self.name}: libvirtd not ready after {LIBVIRTD_READY_TIMEOUT_S} s")

    def kill_daemon(self) -> None:
        """SIGKILL libvirtd (its QEMU processes keep running, as on a real host)."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=LIBVIRTD_STOP_TIMEOUT_S)

    @property
    def daemon_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        out = []
        for name in ("libvirtd.stderr", "libvirtd.log"):
            log_file = self.root / "log" / name
            if log_file.exists():
                out.extend(log_file.read_text(errors="replace").splitlines()[-lines:])
        return "\n".join(out)

    def in_namespaces(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this host's network and mount namespaces (those of its running libvirtd)."""
        if not self.daemon_running:
            raise HarnessError(f"{self.name}: libvirtd is not running")
        assert self.process is not None
        return [
            "nsenter",
            f"--net=/run/netns/{self.netns}",
            f"--mount=/proc/{self.process.pid}/ns/mnt",
            *argv,
        ]

    def kill_everything(self) -> None:
        """Kill every process in the host's network namespace: libvirtd and its QEMU guests."""
        pids = _run(["ip", "netns", "pids", self.netns], check=False).split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        deadline = time.monotonic() + LIBVIRTD_STOP_TIMEOUT_S
        while time.monotonic() < deadline and _run(["ip", "netns", "pids", self.netns], check=False).split():
            time.sleep(0.05)
        if self.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=1)


class TwoHosts:
    """Two libvirt hosts joined by a veth pair; a context manager that always tears everything down."""

    def __init__(self, base_dir: Path | None = None) -> None:
        tag = f"dlm{os.getpid() % 100000}"
        self.root = Path(tempfile.mkdtemp(prefix="dlm-libvirt-", dir=base_dir))
        self.source = LibvirtHost("hostA", f"{tag}a", f"{SUBNET_PREFIX}.1", self.root / "hostA")
        self.target = LibvirtHost("hostB", f"{tag}b", f"{SUBNET_PREFIX}.2", self.root / "hostB")
        self._veth = (f"{tag}va", f"{tag}vb")
        self._netns_made: list[str] = []

    @property
    def hosts(self) -> tuple[LibvirtHost, LibvirtHost]:
        return (self.source, self.target)

    def __enter__(self) -> TwoHosts:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def start(self) -> None:
        for host in self.hosts:
            _run(["ip", "netns", "add", host.netns])
            self._netns_made.append(host.netns)
            _run(["ip", "-n", host.netns, "link", "set", "lo", "up"])
        va, vb = self._veth
        ends = ["ip", "link", "add", va, "netns", self.source.netns, "type", "veth", "peer", vb]
        _run([*ends, "netns", self.target.netns])
        for host, dev in ((self.source, va), (self.target, vb)):
            _run(["ip", "-n", host.netns, "addr", "add", f"{host.ip}/24", "dev", dev])
            _run(["ip", "-n", host.netns, "link", "set", dev, "up"])
        for host in self.hosts:
            host.write_config()
            host.start()

    def close(self) -> None:
        """Kill every process of both hosts, delete the namespaces and the directories. Idempotent."""
        for host in self.hosts:
            if host.netns in self._netns_made:
                try:
                    host.kill_everything()
                except Exception:
                    log.exception("harness: killing %s's processes failed", host.name)
        for netns in self._netns_made:
            _run(["ip", "netns", "del", netns], check=False)
        self._netns_made.clear()
        if os.environ.get("DLM_KEEP_HARNESS"):
            log.warning("harness: keeping %s (DLM_KEEP_HARNESS)", self.root)
        else:
            shutil.rmtree(self.root, ignore_errors=True)
