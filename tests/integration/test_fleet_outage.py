"""The store goes away for a while (``pg_ctl stop``, then ``start``) under two busy workers: nothing is lost
and no worker exits.

Attempts keep running under the controller meanwhile; the ones that end during the outage are recorded when
the store answers again (not thrown away and retried); the ones still running are not taken over by the
other worker although their leases (8 s here) ran out by the clock during the outage (the database restarted
less than a lease ago); each worker logs the outage once and its end once. The outage lasts
``FLEET_OUTAGE_S`` seconds (20 by default; the issue's scenario is 60).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from host_engine.models import Droplet
from host_engine.states import MigrationState as S
from host_engine.store import Store
from tests import pg
from tests.fleet import GIB, FileHypervisor, WorkerSpec, add_hosts, notified_migration, start_worker, stop

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

pg_server = pg.pg_server  # the module's own server: the test stops and starts it

OUTAGE_S = float(os.environ.get("FLEET_OUTAGE_S", "20"))
WAIT_S = 120.0


def _pg_ctl(server: pg.PostgresServer, *args: str) -> None:
    argv = [str(server.bin_dir / "pg_ctl"), "-D", str(server.root / "data"), "-w", "-t", "60", *args]
    if os.geteuid() == 0:
        argv = ["runuser", "-u", "postgres", "--", *argv]
    subprocess.run(argv, check=True, capture_output=True, timeout=90)


def stop_server(server: pg.PostgresServer) -> None:
    _pg_ctl(server, "-m", "fast", "stop")


def start_server(server: pg.PostgresServer) -> None:
    # The options tests/pg.py started it with: same port and socket directory.
    options = (
        f"-c listen_addresses=127.0.0.1 -p {server.port} -k {server.root / 'sock'} "
        "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    )
    _pg_ctl(server, "-l", str(server.root / "server.log"), "-o", options, "start")


def test_fleet_store_outage_loses_nothing_and_no_worker_exits(
    pg_server: pg.PostgresServer, tmp_path: Path
) -> None:
    url = pg_server.new_database()
    hv = FileHypervisor(tmp_path / "hv")
    log = tmp_path / "workers.log"
    store = Store.open(url)
    mids = []
    try:
        add_hosts(store, ("a", "b", "x", "y"))
        now = store.now()
        with store.begin() as tx:
            for i in range(8):
                did, source = f"d{i}", "ab"[i % 2]
                droplet = Droplet(did, source, 1, GIB, 4 * GIB, addresses=(f"10.0.0.{i + 2}",))
                mids.append(notified_migration(tx, droplet, "xy"[(i // 2) % 2], now).id)
                hv.add_droplet(did, source)
    finally:
        store.close()

    def spec(name: str, duration_s: float) -> WorkerSpec:
        return WorkerSpec(db=url, hv_dir=str(hv.root), name=name, duration_s=duration_s, lease="8s",
                          renew_every="1s", max_concurrent=2)  # fmt: skip

    # w1's attempts outlast the outage; w2's end during it.
    workers = [start_worker(spec("w1", OUTAGE_S + 8), log), start_worker(spec("w2", 4.0), log)]
    try:
        with Store.open(url) as watcher:
            deadline = time.monotonic() + WAIT_S
            while {m.claimed_by for m in watcher.list_migrations(states=[S.RUNNING])} != {"w1", "w2"}:
                assert time.monotonic() < deadline, log.read_text()[-4000:]
                time.sleep(0.2)
            running_before = {m.id: m.claimed_by for m in watcher.list_migrations(states=[S.RUNNING])}
        stop_server(pg_server)
        try:
            deadline = time.monotonic() + OUTAGE_S
            while time.monotonic() < deadline:
                assert [w.poll() for w in workers] == [None, None], log.read_text()[-4000:]
                time.sleep(0.5)
            switched_meanwhile = sum(len(d["switchovers"]) for d in hv.read()["droplets"].values())
        finally:
            start_server(pg_server)
        assert switched_meanwhile >= 1  # attempts went on while the store was away

        with Store.open(url) as store:
            deadline = time.monotonic() + WAIT_S
            while any(m.state is not S.COMPLETED for m in store.list_migrations()):
                assert time.monotonic() < deadline, log.read_text()[-6000:]
                assert [w.poll() for w in workers] == [None, None], log.read_text()[-4000:]
                time.sleep(0.5)
            migrations = store.list_migrations()
            logs = {m.id: store.migration_log(m.id) for m in migrations}
    finally:
        for w in workers:
            stop(w)
    assert [w.returncode for w in workers] == [0, 0], log.read_text()[-4000:]

    state = hv.read()
    for m in migrations:
        assert m.attempt == 1, (m.id, [e.message for e in logs[m.id]])  # no attempt thrown away
        assert state["droplets"][m.droplet_id]["host"] == m.target_host
        assert len(state["droplets"][m.droplet_id]["switchovers"]) == 1
        claims = [e.data["worker"] for e in logs[m.id] if e.kind == "claim"]
        assert len(claims) == 1, [e.message for e in logs[m.id]]  # nobody took another's over
    for mid, worker in running_before.items():
        assert [e.data["worker"] for e in logs[mid] if e.kind == "claim"] == [worker]

    text = log.read_text()
    for name in ("w1", "w2"):
        mine = [line for line in text.splitlines() if f" {name} " in line]
        assert sum("executor: store unreachable" in line for line in mine) == 1, mine[-20:]
        assert sum("executor: store reachable again" in line for line in mine) == 1, mine[-20:]
        # Ridden out quietly: a few lines per part, not one per tick.
        assert len([line for line in mine if "WARNING" in line or "ERROR" in line]) <= 12, mine
