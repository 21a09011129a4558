"""`kill -9` anywhere in the metadata server's process tree leaves nothing of it running or listening.

`serve` forks two gunicorn arbiters, which fork the workers. A supervisor (systemd, a test) knows only the
`serve` process; if its death left the others serving, a restart could not bind the ports, or a restart test
could pass against the orphans. `MetadataServer.stop` checks the same after every stop and restart.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.servers import LEFTOVER_TIMEOUT_S, MetadataServer, curl, port_is_free, session_processes
from tests.support import require_binary


@pytest.fixture
def server(tmp_path: Path):  # type: ignore[no-untyped-def]
    require_binary("curl")
    with MetadataServer.start(tmp_path / "ms", "--workers", "2") as ms:
        ms.register("d2", ["127.0.0.2"])
        ms.set_event("d2", "ev-1")
        yield ms


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def whole_tree(serve: int, size: int, timeout_s: float = 10.0) -> dict[int, str]:
    """``serve``'s process tree once it has all ``size`` processes: the server answers as soon as one worker
    per listener is up, and under load gunicorn forks the second guest worker up to seconds later (seen:
    5 of 6 while the libvirt harness ran)."""
    deadline = time.monotonic() + timeout_s
    tree = session_processes(serve)
    while len(tree) < size and time.monotonic() < deadline:
        time.sleep(0.05)
        tree = session_processes(serve)
    assert len(tree) == size, tree
    return tree


def test_server_kill9_of_serve_ends_every_process_and_frees_the_ports(server: MetadataServer) -> None:
    assert server.proc is not None
    serve = server.proc.pid
    old_tree = whole_tree(serve, 6)  # serve, 2 arbiters, 2 guest workers, 1 admin worker
    os.kill(serve, signal.SIGKILL)  # `serve` alone, as `kill -9 PID` or a supervisor's timeout does
    server.proc.wait()
    server.proc = None
    start = time.monotonic()
    server.assert_nothing_left(serve)  # fails, naming the survivors, if anything is left
    assert time.monotonic() - start < LEFTOVER_TIMEOUT_S
    assert port_is_free(server.guest_port) and port_is_free(server.admin_port)
    server.launch()  # the new `serve` binds the same ports
    assert server.proc is not None
    assert not set(session_processes(server.proc.pid)) & set(old_tree)
    assert curl(server.guest_url + "/v1/maintenance_event", "127.0.0.2").stdout == b"live_migrate"


def test_server_kill9_of_one_arbiter_stops_the_whole_server(server: MetadataServer) -> None:
    assert server.proc is not None
    serve = server.proc.pid
    arbiters = children(serve)
    assert len(arbiters) == 2
    os.kill(arbiters[0], signal.SIGKILL)  # its workers lose their arbiter; serve stops the other listener
    assert server.proc.wait(10) == 1
    server.proc = None
    server.assert_nothing_left(serve)
    server.launch()
    assert curl(server.guest_url + "/v1/maintenance_event", "127.0.0.2").stdout == b"live_migrate"
