"""A worker killed with SIGKILL mid-attempt, on a real PostgreSQL: its attempts are taken over, the droplet
switches over once.

- Another worker takes a dead worker's attempt over once its lease expires (by the database's clock; the
  lease is configurable, 60 s by default; 8 s here): a job still running is aborted (source untouched) and
  retried; a job that finished while nobody watched is adopted, and recorded with the numbers the dead worker
  had recorded.
- The same worker restarted (same name) takes its own attempt back at once, without waiting for the lease.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from host_engine.models import Droplet, Migration
from host_engine.states import MigrationState as S
from host_engine.store import Store
from tests import pg
from tests.fleet import GIB, FileHypervisor, WorkerSpec, add_hosts, notified_migration, start_worker, stop

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

pg_server = pg.pg_server

LEASE_S = 8
WAIT_S = 90.0
# The bound for a dead worker's attempts to be taken over.
TAKEOVER_BOUND_S = 60.0


class Fleet:
    def __init__(self, url: str, tmp_path: Path) -> None:
        self.url = url
        self.store = Store.open(url)
        self.hv = FileHypervisor(tmp_path / "hv")
        self.log = tmp_path / "workers.log"
        add_hosts(self.store, ("a", "b"))

    def migration(self, droplet_id: str) -> str:
        self.hv.add_droplet(droplet_id, "a")
        now = self.store.now()
        with self.store.begin() as tx:
            droplet = Droplet(droplet_id, "a", 1, GIB, 4 * GIB, addresses=("10.0.0.2",))
            return notified_migration(tx, droplet, "b", now).id

    def worker(self, name: str, *, duration_s: float, lease: str = f"{LEASE_S}s") -> WorkerSpec:
        return WorkerSpec(
            db=self.url,
            hv_dir=str(self.hv.root),
            name=name,
            duration_s=duration_s,
            lease=lease,
            renew_every="1s",
        )

    def wait(self, what: str, mid: str, check: Callable[[Migration], bool]) -> Migration:
        deadline = time.monotonic() + WAIT_S
        while True:
            m = self.store.get_migration(mid)
            if check(m):
                return m
            assert time.monotonic() < deadline, (
                f"timed out waiting for {what}\n{self.log.read_text()[-4000:]}"
            )
            time.sleep(0.2)

    def wait_running(self, mid: str, worker: str) -> Migration:
        return self.wait(
            f"{worker} to be running {mid}",
            mid,
            lambda m: m.state is S.RUNNING and m.claimed_by == worker and "progress" in m.stats,
        )

    def first_claim_at(self, mid: str, worker: str) -> float:
        """Seconds since the epoch at which ``worker`` first claimed ``mid`` (the store's clock)."""
        claims = [
            e.at
            for e in self.store.migration_log(mid)
            if e.kind == "claim" and e.data.get("worker") == worker
        ]
        return claims[0].timestamp()

    def assert_switched_once(self, droplet_id: str) -> None:
        state = self.hv.read()["droplets"][droplet_id]
        assert state["host"] == "b" and len(state["switchovers"]) == 1, state
        assert self.store.get_droplet(droplet_id).host == "b"


@pytest.fixture
def fleet(pg_server: pg.PostgresServer, tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(pg_server.new_database(), tmp_path)
    yield f
    f.store.close()


def test_fleet_killed_worker_mid_job_is_taken_over_within_the_lease_then_retried(fleet: Fleet) -> None:
    mid = fleet.migration("d1")
    w1 = start_worker(fleet.worker("w1", duration_s=600.0), fleet.log)  # a job far from done
    w2 = None
    try:
        fleet.wait_running(mid, "w1")
        w1.kill()
        w1.wait(10)
        killed_at = time.time()
        w2 = start_worker(fleet.worker("w2", duration_s=2.0), fleet.log)
        done = fleet.wait("completion by w2", mid, lambda m: m.state is S.COMPLETED)
        taken_after_s = fleet.first_claim_at(mid, "w2") - killed_at
    finally:
        stop(w1)  # already dead, unless the test failed before killing it
        if w2 is not None:
            stop(w2)
    assert taken_after_s < TAKEOVER_BOUND_S
    assert taken_after_s > LEASE_S - 3  # not before the lease ran out: w1 might have been alive
    log = fleet.store.migration_log(mid)
    assert any("lease of w1 expired" in e.message for e in log)
    assert any("worker died mid-attempt" in e.message for e in log)  # attempt 1: aborted, source kept
    assert done.attempt == 2
    jobs = fleet.hv.read()["jobs"]
    assert jobs[f"{mid}.1"]["status"] == "aborted" and jobs[f"{mid}.2"]["status"] == "done"
    fleet.assert_switched_once("d1")


def test_fleet_job_that_finished_after_its_worker_died_is_adopted_with_its_recorded_numbers(
    fleet: Fleet,
) -> None:
    mid = fleet.migration("d1")
    w1 = start_worker(fleet.worker("w1", duration_s=5.0), fleet.log)
    w2 = None
    try:
        fleet.wait_running(mid, "w1")
        w1.kill()
        w1.wait(10)
        w2 = start_worker(fleet.worker("w2", duration_s=2.0), fleet.log)
        done = fleet.wait("completion by w2", mid, lambda m: m.state is S.COMPLETED)
    finally:
        stop(w1)  # already dead, unless the test failed before killing it
        if w2 is not None:
            stop(w2)
    assert done.attempt == 1  # the first attempt's job completed: adopted, not retried
    last = done.stats["last_attempt"]
    assert last["outcome"] == "completed"
    assert last["recovered_by"] == "w2" and last["previous_worker"] == "w1"
    assert last["bytes_transferred"] > 0  # what w1 had recorded, not zeros
    assert last["duration_s"] > 1
    fleet.assert_switched_once("d1")


def test_fleet_restarted_worker_takes_its_own_attempt_back_at_once(fleet: Fleet) -> None:
    """Under the default name (the hostname: stable across restarts) and the default lease (60 s): the
    restarted worker does not wait for the lease."""
    mid = fleet.migration("d1")
    w1 = start_worker(fleet.worker("", duration_s=600.0, lease="60s"), fleet.log)
    again = None
    try:
        running = fleet.wait_running(mid, socket.gethostname())
        w1.kill()
        w1.wait(10)
        killed_at = time.monotonic()
        again = start_worker(fleet.worker("", duration_s=2.0, lease="60s"), fleet.log)
        done = fleet.wait("completion by the restarted worker", mid, lambda m: m.state is S.COMPLETED)
        took_s = time.monotonic() - killed_at
    finally:
        stop(w1)  # already dead, unless the test failed before killing it
        if again is not None:
            stop(again)
    assert running.claimed_by == socket.gethostname()
    assert took_s < 30  # recovered, retried and completed well within one lease
    assert done.attempt == 2
    log = fleet.store.migration_log(mid)
    assert any("worker died mid-attempt" in e.message for e in log)
    fleet.assert_switched_once("d1")
