"""Three ``host-engine run`` processes (the CLI as shipped, the simulated datacenter kept in the store) on one
real PostgreSQL, with a backlog all due at once: ``[concurrency]`` holds across them, counted from the store's
``migration_log``; every migration runs once; SIGTERM stops each within 10 s."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from host_engine.models import Droplet, Host, NewMigration
from host_engine.states import MigrationState as S
from host_engine.store import Store
from tests import pg
from tests.fleet import GIB, attempt_intervals, max_overlap
from tests.support import require

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

BIN = Path(sys.executable).parent / "host-engine"
N = 12
LIMITS = {"max_parallel": 3, "max_per_source": 3, "max_per_target": 2}
WAIT_S = 180.0


@pytest.fixture(scope="module")
def pg_server() -> Iterator[pg.PostgresServer]:
    reason = pg.missing_reason()
    require(reason is None, reason or "")
    with pg.postgres_server() as server:
        yield server


def test_fleet_of_host_engine_run_processes_keeps_the_limits(
    pg_server: pg.PostgresServer, tmp_path: Path
) -> None:
    url = pg_server.new_database()
    with Store.open(url) as store:
        for h in ("hv1", "hv2", "hv3", "hv4"):
            store.add_host(Host(h, "nyc1", 256, 1024 * GIB, 10_000 * GIB, hypervisor_uri=f"sim://{h}"))
        now = store.now()
        with store.begin() as tx:
            for i in range(N):
                did = f"d{i:02d}"
                tx.add_droplet(Droplet(did, "hv1", 1, GIB, 8 * GIB, addresses=(f"10.2.0.{i + 1}",)))
                target = ("hv2", "hv3", "hv4")[i % 3]
                m = tx.create_migration(NewMigration(did, "hv1", target, now, now, now + timedelta(hours=1)))
                tx.transition(m.id, S.NOTIFIED, notified_at=now)

    settings = [arg for k, v in LIMITS.items() for arg in ("--set", f"concurrency.{k}={v}")]
    log = tmp_path / "workers.log"
    procs = []
    with log.open("ab") as out:
        for n in (1, 2, 3):
            procs.append(
                subprocess.Popen(
                    [
                        str(BIN),
                        "--db",
                        url,
                        *settings,
                        "run",
                        "--worker",
                        f"w{n}",
                        "--sim-speed",
                        "4",
                        "--poll-interval",
                        "100ms",
                    ],
                    stdout=out,
                    stderr=out,
                )
            )
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
