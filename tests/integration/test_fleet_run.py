"""Three ``host-engine run`` processes (the CLI as shipped, the simulated datacenter kept in the store) on one
real PostgreSQL, with a backlog all due at once: ``[concurrency]`` holds across them, counted from the store's
``migration_log``; every migration runs once; SIGTERM stops each within 10 s."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from host_engine.models import Droplet
from host_engine.states import MigrationState as S
from host_engine.store import Store
from tests import pg
from tests.fleet import GIB, add_hosts, attempt_intervals, max_overlap, notified_migration, start_run

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

pg_server = pg.pg_server

N = 12
LIMITS = {"max_parallel": 3, "max_per_source": 3, "max_per_target": 2}
WAIT_S = 180.0


def test_fleet_of_host_engine_run_processes_keeps_the_limits(
    pg_server: pg.PostgresServer, tmp_path: Path
) -> None:
    url = pg_server.new_database()
    with Store.open(url) as store:
        add_hosts(store, ("hv1", "hv2", "hv3", "hv4"), scheme="sim")
        now = store.now()
        with store.begin() as tx:
            for i in range(N):
                droplet = Droplet(f"d{i:02d}", "hv1", 1, GIB, 8 * GIB, addresses=(f"10.2.0.{i + 1}",))
                notified_migration(tx, droplet, ("hv2", "hv3", "hv4")[i % 3], now)

    settings = tuple(arg for k, v in LIMITS.items() for arg in ("--set", f"concurrency.{k}={v}"))
    log = tmp_path / "workers.log"
    procs = [
        start_run(url, f"w{n}", log, "--sim-speed", "4", "--poll-interval", "100ms", settings=settings)
        for n in (1, 2, 3)
    ]
    stop_s = []
    try:
        with Store.open(url) as store:
            deadline = time.monotonic() + WAIT_S
            while any(m.state is not S.COMPLETED for m in store.list_migrations()):
                assert time.monotonic() < deadline, log.read_text()[-5000:]
                assert all(p.poll() is None for p in procs), log.read_text()[-5000:]
                time.sleep(0.5)
        for p in procs:
            started = time.monotonic()
            os.kill(p.pid, signal.SIGTERM)
            p.wait(30)
            stop_s.append(time.monotonic() - started)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    assert [p.returncode for p in procs] == [0, 0, 0], log.read_text()[-5000:]
    assert max(stop_s) < 10

    with Store.open(url) as store:
        overlap = max_overlap(attempt_intervals(store))
        assert overlap.fleet <= LIMITS["max_parallel"], overlap
        assert max(overlap.per_source.values()) <= LIMITS["max_per_source"], overlap
        assert max(overlap.per_target.values()) <= LIMITS["max_per_target"], overlap
        assert overlap.fleet == LIMITS["max_parallel"], overlap  # the backlog did run at the limit
        workers = set()
        for m in store.list_migrations():
            assert m.attempt == 1, (m.id, m.last_error)
            assert store.get_droplet(m.droplet_id).host == m.target_host
            workers |= {e.data.get("worker") for e in store.migration_log(m.id) if e.kind == "claim"}
        assert workers <= {"w1", "w2", "w3"} and len(workers) >= 2
