"""Three engine worker processes on one real PostgreSQL with a backlog: the fleet's limits hold.

Each worker alone could run 4 attempts at once (``[engine] max_concurrent``); together they could run 12.
``[concurrency]`` says 4 fleet-wide, 2 out of one source, 2 into one target: checked in the store when a
claim is taken, across workers. How many ran at once is counted from the store's ``migration_log``, not
from what the workers believe.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from host_engine.models import Droplet
from host_engine.states import MigrationState as S
from host_engine.store import Store
from tests import pg
from tests.fleet import (
    GIB,
    FileHypervisor,
    WorkerSpec,
    add_hosts,
    attempt_intervals,
    max_overlap,
    notified_migration,
    start_worker,
    stop,
)

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

pg_server = pg.pg_server

SOURCES = ("a", "b", "c")
TARGETS = ("x", "y", "z")
PER_SOURCE = 6
WALL_LIMIT_S = 180.0


def test_fleet_workers_with_a_backlog_never_exceed_any_limit(
    pg_server: pg.PostgresServer, tmp_path: Path
) -> None:
    url = pg_server.new_database()
    hv = FileHypervisor(tmp_path / "hv")
    with Store.open(url) as store:
        add_hosts(store, SOURCES + TARGETS)
        now = store.clock()
        with store.begin() as tx:
            for si, source in enumerate(SOURCES):
                for i in range(PER_SOURCE):
                    did = f"{source}{i}"
                    droplet = Droplet(did, source, 1, GIB, 4 * GIB, addresses=(f"10.{si}.0.{i + 1}",))
                    notified_migration(tx, droplet, TARGETS[(si + i) % len(TARGETS)], now)
                    hv.add_droplet(did, source)

        log = tmp_path / "workers.log"
        specs = [
            WorkerSpec(db=url, hv_dir=str(hv.root), name=f"w{n}", duration_s=2.0, max_concurrent=4)
            for n in (1, 2, 3)
        ]
        workers = [start_worker(s, log) for s in specs]
        try:
            deadline = time.monotonic() + WALL_LIMIT_S
            while any(m.state is not S.COMPLETED for m in store.list_migrations()):
                assert time.monotonic() < deadline, log.read_text()[-5000:]
                assert all(w.poll() is None for w in workers), log.read_text()[-5000:]
                time.sleep(0.5)
        finally:
            for w in workers:
                stop(w)
        assert [w.returncode for w in workers] == [0, 0, 0], log.read_text()[-5000:]

        overlap = max_overlap(attempt_intervals(store))
        spec = specs[0]
        assert overlap.fleet <= spec.max_parallel, overlap
        assert max(overlap.per_source.values()) <= spec.max_per_source, overlap
        assert max(overlap.per_target.values()) <= spec.max_per_target, overlap
        # Not vacuous: the fleet did run at its limit.
        assert overlap.fleet == spec.max_parallel, overlap

        state = hv.read()
        claimed_by = set()
        for m in store.list_migrations():
            assert m.attempt == 1, (m.id, m.last_error)
            assert store.get_droplet(m.droplet_id).host == m.target_host
            assert state["droplets"][m.droplet_id]["host"] == m.target_host
            assert len(state["droplets"][m.droplet_id]["switchovers"]) == 1
            claimed_by |= {e.data.get("worker") for e in store.migration_log(m.id) if e.kind == "claim"}
        # Several processes claimed, so the limits held across workers, not within one. Not necessarily all
        # three: a worker whose attempt ends refills its slot at once, so with the fleet at its limit a worker
        # that started late may find no free slot before the backlog is done (seen once in CI).
        assert len(claimed_by) >= 2 and claimed_by <= {"w1", "w2", "w3"}, claimed_by
