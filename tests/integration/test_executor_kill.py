"""A worker process killed with SIGKILL in the middle of a migration; another worker recovers it.

Both workers run ``SimTickStep`` (the executor on the simulated datacenter kept in the store), as
``host-engine run`` does, on one SQLite store. The dead worker's claim expires, the survivor makes the droplet
run on exactly one host (source resumed, target cleaned), retries, and completes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest

from host_engine.controller import GiB
from host_engine.engine_steps import SimTickStep
from host_engine.executor import ExecutorConfig
from host_engine.models import Droplet, Host, NewMigration
from host_engine.retry import RetryConfig
from host_engine.states import MigrationState as S
from host_engine.store import Store

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
LEASE_S = 2.0
SPEED = 4.0  # simulated seconds per wall second: the 9 GiB copy takes ~2 s of wall time
WALL_LIMIT_S = 60.0


def config(worker: str) -> ExecutorConfig:
    return ExecutorConfig(
        worker=worker,
        lease_s=LEASE_S,
        renew_every_s=0.5,  # simulated seconds between recovery scans and claim renewals
        progress_every_s=0.5,
        retry=RetryConfig(backoff_s=1.0, jitter=0.0),
    )


def worker_main(db: str, worker: str) -> None:
    """A worker process: tick the executor on the stored world until killed (or the wall limit)."""
    store = Store.open(db)
    step = SimTickStep.open(store, config(worker), speed=SPEED)
    deadline = time.monotonic() + WALL_LIMIT_S
    while time.monotonic() < deadline:
        step.tick()
        time.sleep(0.05)


def test_executor_worker_killed_mid_migration_is_recovered_by_another_process(tmp_path: Path) -> None:
    db = str(tmp_path / "engine.db")
    store = Store.open(db)
    for name in ("a", "b"):
        store.add_host(Host(name, "nyc1", 32, 128 * GiB, 2000 * GiB, hypervisor_uri=f"sim://{name}"))
    store.add_droplet(Droplet("d1", "a", 2, GiB, 8 * GiB, addresses=("10.0.0.2",)))
    now = store.clock()
    (m,) = store.create_migrations([NewMigration("d1", "a", "b", now, now, now + timedelta(hours=1))])
    store.transition(m.id, S.NOTIFIED, notified_at=now)

    code = f"from tests.integration.test_executor_kill import worker_main; worker_main({db!r}, 'w1')"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    try:
        deadline = time.monotonic() + WALL_LIMIT_S
        while True:
            assert time.monotonic() < deadline, "w1 never got going"
            assert proc.poll() is None, "w1 exited"
            current = store.get_migration(m.id)
            progress = current.stats.get("progress") or {}
            if (
                current.state is S.RUNNING
                and progress.get("phase") == "disk"
                and progress.get("elapsed_s", 0) > 1
            ):
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

    killed = store.get_migration(m.id)
    assert killed.state is S.RUNNING
    assert killed.claimed_by == "w1"

    survivor = SimTickStep.open(store, config("w2"), speed=SPEED)
    # The stored world is the one w1 saved on its last tick: the copy under way, the droplet still on a.
    assert survivor.world.droplets["d1"].host == "a"
    assert sorted(survivor.world.hosts_holding("d1")) == ["a", "b"]
    deadline = time.monotonic() + WALL_LIMIT_S
    while store.get_migration(m.id).state is not S.COMPLETED:
        assert time.monotonic() < deadline, store.migration_log(m.id)
        survivor.tick()
        time.sleep(0.05)

    done = store.get_migration(m.id)
    assert done.attempt == 2
    log = store.migration_log(m.id)
    assert any("lease of w1 expired" in e.message for e in log)
    assert any("worker died" in e.message for e in log)
    assert store.get_droplet("d1").host == "b"
    assert survivor.world.droplets["d1"].host == "b"
    assert survivor.world.hosts_holding("d1") == ["b"]
    store.close()
