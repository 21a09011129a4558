"""``host-engine run`` executing migrations, as a real process on SQLite with the simulated hypervisor and a real
metadata server: an evacuation completes (store and metadata server agree, metrics served); ``abort`` of a
running migration leaves the source untouched; SIGTERM releases the attempts still running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

from host_engine.drivers.base import DomainState
from host_engine.drivers.sim import SimWorld, load_world
from host_engine.models import Droplet, Host
from host_engine.store import Store
from tests.fleet import engine_run
from tests.servers import MetadataServer, free_port

BIN = Path(sys.executable).parent / "host-engine"
WAIT_S = 20.0
GIB = 1024**3


def he(db: Path, *args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        [str(BIN), "--db", str(db), *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert r.returncode == code, (args, r.returncode, r.stdout, r.stderr)
    return r


def migrations(db: Path) -> dict[str, dict[str, Any]]:
    """droplet id -> its migration (read in this process: polling through a subprocess costs half a second a
    look)."""
    store = Store.open(db)
    try:
        return {
            m.droplet_id: {
                "id": m.id,
                "state": m.state.value,
                "attempt": m.attempt,
                "last_error": m.last_error,
                "claimed_by": m.claimed_by,
                "stats": dict(m.stats),
            }
            for m in store.list_migrations()
        }
    finally:
        store.close()


def wait_for(what: str, check: Callable[[], bool], log: Path) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}\n{log.read_text()}")


def fleet(db: Path, ms: MetadataServer, droplets: dict[str, tuple[int, int]]) -> None:
    """hv1..hv3 served by ``ms``; ``droplets`` (id -> memory GiB, disk GiB) on hv1. Written in this process,
    as ``host add`` / ``droplet add`` would (those commands have their own tests)."""
    store = Store.open(db)
    try:
        for name in ("hv1", "hv2", "hv3"):
            store.add_host(
                Host(name=name, datacenter="lo", vcpus=16, memory_bytes=64 * GIB, disk_bytes=1024 * GIB,
                     metadata_url=ms.admin_url, metadata_token_file=str(ms.token_file))
            )  # fmt: skip
        for i, (did, (memory_gib, disk_gib)) in enumerate(sorted(droplets.items())):
            store.add_droplet(
                Droplet(id=did, host="hv1", vcpus=1, memory_bytes=memory_gib * GIB, disk_bytes=disk_gib * GIB,
                        addresses=(f"127.0.7.{i + 1}",))
            )  # fmt: skip
    finally:
        store.close()


def stop(proc: subprocess.Popen[bytes], log: Path) -> None:
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=10) == 0, log.read_text()
    assert "engine stopped" in log.read_text()


def server_droplets(ms: MetadataServer) -> dict[str, dict[str, Any]]:
    r = ms.admin("GET", "/admin/v1/droplets")
    r.raise_for_status()
    return {d["id"]: d for d in r.json()["droplets"]}


def world_of(db: Path) -> SimWorld:
    store = Store.open(db)
    try:
        world = load_world(store)
    finally:
        store.close()
    assert world is not None
    return world


def assert_untouched_on(world: SimWorld, droplet_id: str, host: str) -> None:
    assert world.hosts_holding(droplet_id) == [host]  # nothing left on a target
    d = world.droplets[droplet_id]
    assert (d.host, d.state, d.throttle_pct, d.disk_limit_bps) == (host, DomainState.RUNNING, 0, None)


def test_run_evacuates_a_host_store_and_metadata_server_agree_metrics_served(tmp_path: Path) -> None:
    db, log = tmp_path / "engine.db", tmp_path / "engine.log"
    port = free_port()
    with MetadataServer.start(tmp_path / "ms") as ms:
        fleet(db, ms, {"web1": (1, 4), "web2": (1, 6)})
        he(db, "evacuate", "hv1", "--start", "+1s", "--notice", "1s", "--unsafe-short-notice")
        with engine_run(
            db, log, "--poll-interval", "100ms", "--sim-speed", "10", "--metrics-listen", f"127.0.0.1:{port}"
        ) as proc:
            wait_for(
                "the evacuation to complete",
                lambda: {m["state"] for m in migrations(db).values()} == {"completed"},
                log,
            )
            session = requests.Session()
            session.trust_env = False  # loopback only, never a proxy from the environment
            metrics = session.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            assert 'host_engine_migrations{state="completed"} 2.0' in metrics
            assert 'host_engine_migration_attempts_total{outcome="completed"} 2.0' in metrics
            assert session.get(f"http://127.0.0.1:{port}/other", timeout=5).status_code == 404
            stop(proc, log)
        droplets = {d["id"]: d for d in json.loads(he(db, "droplet", "list", "--json").stdout)}
        assert {droplets["web1"]["host"], droplets["web2"]["host"]} <= {"hv2", "hv3"}
        world = world_of(db)
        for did in ("web1", "web2"):
            assert world.hosts_holding(did) == [droplets[did]["host"]]
        held = server_droplets(ms)
        assert set(held) == {"web1", "web2"}
        assert all(d["event"] is None for d in held.values()), held  # no event left
        report = he(db, "report", migrations(db)["web1"]["id"]).stdout
        assert "REMAINING" in report and "done" in report


def test_abort_of_a_running_migration_and_sigterm_leave_the_sources_untouched(tmp_path: Path) -> None:
    db, log = tmp_path / "engine.db", tmp_path / "engine.log"
    with MetadataServer.start(tmp_path / "ms") as ms:
        # 200 GiB disks sharing hv1's NIC: a minute of copying at sim speed 5, so both still run when we act.
        fleet(db, ms, {"big1": (2, 200), "big2": (2, 200)})
        he(db, "evacuate", "hv1", "--start", "+1s", "--notice", "1s", "--unsafe-short-notice")
        with engine_run(db, log, "--poll-interval", "100ms", "--sim-speed", "5") as proc:
            wait_for(
                "both migrations to run",
                lambda: all(
                    m["state"] == "running" and "progress" in m["stats"] for m in migrations(db).values()
                ),
                log,
            )
            status = he(db, "status").stdout
            assert "running" in status and "ETA" in status, status
            mid = migrations(db)["big1"]["id"]
            out = he(db, "abort", mid).stdout
            assert "abort requested" in out
            wait_for("the abort", lambda: migrations(db)["big1"]["state"] == "cancelled", log)
            stop(proc, log)
        after = migrations(db)
        assert after["big1"]["state"] == "cancelled"
        # SIGTERM released big2 at once: back to notified for a retry, not held until its claim expires.
        assert after["big2"]["state"] == "notified" and after["big2"]["claimed_by"] is None
        assert after["big2"]["attempt"] == 1
        assert "worker shutting down" in (after["big2"]["last_error"] or "")
        world = world_of(db)
        assert_untouched_on(world, "big1", "hv1")
        assert_untouched_on(world, "big2", "hv1")
        held = server_droplets(ms)
        assert held["big1"]["event"] is None  # cancelled: the guest's flag cleared
        assert held["big2"]["event"]["event"] == "live_migrate"  # still to move
        # Bad input to the real process: one line, non-zero, nothing changed.
        before = migrations(db)
        r = he(db, "abort", "m-nope", code=3)
        assert r.stderr.strip() == "host-engine: error: unknown migration 'm-nope'"
        r = he(db, "run", "--driver", "xen", code=2)
        assert len(r.stderr.strip().splitlines()) == 1 and "'--driver'" in r.stderr
        assert migrations(db) == before


def test_migrate_now_as_a_process_prints_progress_and_completes(tmp_path: Path) -> None:
    db = tmp_path / "engine.db"
    with MetadataServer.start(tmp_path / "ms") as ms:
        fleet(db, ms, {"web1": (1, 4)})
        r = he(db, "migrate", "web1", "--to", "hv3", "--now", "--unsafe-short-notice", "--sim-speed", "1")
        lines = r.stdout.splitlines()
        assert any("notice sent" in line for line in lines)
        # QEMU switches web1 over by itself once its RAM has gone once (under a tick): the progress line with
        # an ETA is the disk copy's.
        assert any(", round" in line and "ETA" in line and "no ETA" not in line for line in lines), r.stdout
        assert "completed: web1 now runs on hv3" in lines[-1]
        assert migrations(db)["web1"]["state"] == "completed"
        assert world_of(db).hosts_holding("web1") == ["hv3"]
        assert server_droplets(ms)["web1"]["event"] is None


def test_migrate_now_interrupted_stops_the_attempt_source_untouched(tmp_path: Path) -> None:
    db = tmp_path / "engine.db"
    with MetadataServer.start(tmp_path / "ms") as ms:
        fleet(db, ms, {"big1": (2, 200)})
        proc = subprocess.Popen(
            [str(BIN), "--db", str(db), "--set", "engine.poll_interval=100ms", "migrate", "big1", "--now",
             "--unsafe-short-notice"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if "attempt 1 (live)" in line:
                    break
            proc.send_signal(signal.SIGINT)
            _out, err = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 9, err
        errors = [line for line in err.splitlines() if line.startswith("host-engine: error: ")]
        assert len(errors) == 1 and errors[0].startswith("host-engine: error: interrupted: migration"), err
        m = migrations(db)["big1"]
        assert m["state"] == "notified" and m["claimed_by"] is None  # released, back on the retry path
        assert_untouched_on(world_of(db), "big1", "hv1")
