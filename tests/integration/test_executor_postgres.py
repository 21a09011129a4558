"""Two executor processes on one real PostgreSQL: 50 migrations, each claimed and run exactly once.

Each worker process has its own simulated hypervisor (a private copy of the same datacenter): what is shared,
and what this test is about, is the store, where claims use ``FOR UPDATE SKIP LOCKED``.
"""

from __future__ import annotations

import multiprocessing
import time
from collections import Counter
from datetime import timedelta

import pytest

from host_engine.controller import GiB
from host_engine.drivers.sim import SimClock, SimHypervisor, SimWorld, web
from host_engine.executor import Executor, ExecutorConfig
from host_engine.models import Droplet, Host, NewMigration
from host_engine.states import MigrationState as S
from host_engine.store import Store
from tests import pg

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

N_MIGRATIONS = 50
HOSTS = ("a", "b", "c")
WORKER_WALL_LIMIT_S = 240.0


def droplet_id(i: int) -> str:
    return f"d{i:02d}"


def world() -> SimWorld:
    w = SimWorld(5)
    for h in HOSTS:
        w.add_host(h)
    for i in range(N_MIGRATIONS):
        w.add_droplet(droplet_id(i), "a", memory_bytes=GiB, disk_bytes=4 * GiB, workload=web())
    return w


def run_worker(url: str, worker: str) -> None:
    """One engine worker: tick until nothing is left to claim or run."""
    sim = world()
    clock = SimClock(sim)
    store = Store.open(url)
    try:
        ex = Executor(store, SimHypervisor(sim), ExecutorConfig(worker=worker, max_concurrent=4), clock)
        deadline = time.monotonic() + WORKER_WALL_LIMIT_S
        while time.monotonic() < deadline:
            ex.tick()
            if not ex.active and not store.list_migrations(states=[S.NOTIFIED]):
                return
            clock.sleep(ex.config.tick_s)
    finally:
        store.close()


pg_server = pg.pg_server


def test_executor_two_workers_on_postgres_run_each_of_50_migrations_exactly_once(
    pg_server: pg.PostgresServer,
) -> None:
    url = pg_server.new_database()
    with Store.open(url) as store:
        for h in HOSTS:
            store.add_host(Host(h, "nyc1", 256, 1024 * GiB, 10_000 * GiB, hypervisor_uri=f"sim://{h}"))
        now = store.clock()
        with store.begin() as tx:
            for i in range(N_MIGRATIONS):
                tx.add_droplet(Droplet(droplet_id(i), "a", 1, GiB, 4 * GiB, addresses=(f"10.1.0.{i + 1}",)))
                m = tx.create_migration(
                    NewMigration(
                        droplet_id(i), "a", "b" if i % 2 else "c", now, now, now + timedelta(hours=1)
                    )
                )
                tx.transition(m.id, S.NOTIFIED, notified_at=now)

        ctx = multiprocessing.get_context("spawn")
        workers = [ctx.Process(target=run_worker, args=(url, f"w{n}")) for n in (1, 2)]
        for p in workers:
            p.start()
        for p in workers:
            p.join(WORKER_WALL_LIMIT_S + 60)
            assert p.exitcode == 0

        migrations = store.list_migrations()
        assert len(migrations) == N_MIGRATIONS
        runners: Counter[str] = Counter()
        for m in migrations:
            assert m.state is S.COMPLETED, (m.id, m.state, m.last_error)
            assert m.attempt == 1
            assert store.get_droplet(m.droplet_id).host == m.target_host
            log = store.migration_log(m.id)
            starts = [e for e in log if e.to_state is S.RUNNING]
            claims = [e for e in log if e.kind == "claim"]
            assert len(starts) == 1, [e.message for e in log]
            assert len(claims) == 1, [e.message for e in log]
            runners[claims[0].data["worker"]] += 1
        # Both workers took part (neither starved), and between them ran all 50 exactly once.
        assert set(runners) == {"w1", "w2"}
        assert sum(runners.values()) == N_MIGRATIONS
