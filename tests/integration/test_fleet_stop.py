"""One worker whose hypervisor stops answering, on a real PostgreSQL with a real metadata server.

A hypervisor call that blocks stalls only its own migration: another migration runs and completes, a notice
that falls due is sent, and SIGTERM ends the process within 10 s, the stuck attempt's claim released so the
next worker recovers it at once (not after the 60 s lease). A second process under a name already held is
refused at start, in one line.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from host_engine.models import Droplet, Migration, NewMigration
from host_engine.states import MigrationState as S
from host_engine.store import Store
from tests import pg
from tests.fleet import GIB, HOST_ENGINE_BIN, FileHypervisor, WorkerSpec, add_hosts, start_worker, stop
from tests.servers import MetadataServer

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

pg_server = pg.pg_server

WAIT_S = 60.0
SIGTERM_BOUND_S = 10.0  # the bound


def wait(store: Store, mid: str, what: str, check: Callable[[Migration], bool], log: Path) -> Migration:
    deadline = time.monotonic() + WAIT_S
    while True:
        m = store.get_migration(mid)
        if check(m):
            return m
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{log.read_text()[-4000:]}"
        time.sleep(0.2)


def test_fleet_hung_hypervisor_call_stalls_nothing_else_and_sigterm_hands_it_over(
    pg_server: pg.PostgresServer, tmp_path: Path
) -> None:
    url = pg_server.new_database()
    hv = FileHypervisor(tmp_path / "hv")
    log = tmp_path / "workers.log"
    with MetadataServer.start(tmp_path / "ms") as ms, Store.open(url) as store:
        add_hosts(store, ("a", "x"), metadata=ms)
        now = store.now()
        ids = {}
        for i, did in enumerate(("stuck", "other", "later")):
            store.add_droplet(Droplet(did, "a", 1, GIB, 4 * GIB, addresses=(f"127.0.9.{i + 1}",)))
            hv.add_droplet(did, "a")
            # "later" is told now and moves in ten minutes; the others are due at once.
            not_before = now + timedelta(minutes=10) if did == "later" else now
            (m,) = store.create_migrations([NewMigration(did, "a", "x", not_before, now, not_before)])
            if did != "later":
                store.transition(m.id, S.NOTIFIED, notified_at=now)
            ids[did] = m.id
        hv.hang("stuck")

        spec = WorkerSpec(db=url, hv_dir=str(hv.root), name="w1", duration_s=600.0, lease="60s",
                          renew_every="1s", max_concurrent=2)  # fmt: skip
        w1 = start_worker(spec, log)
        try:
            wait(store, ids["stuck"], "the stuck attempt", lambda m: m.state is S.RUNNING, log)
            hv_state = hv.read()
            assert hv_state["jobs"][f"{ids['stuck']}.1"]["status"] == "running"
            # Meanwhile: the other migration runs to its end (w1's jobs take 600 s: it is stuck too, unless
            # its job is cut short), and the notice goes out.
            wait(store, ids["later"], "the notice", lambda m: m.state is S.NOTIFIED, log)
            assert ms.admin("GET", "/admin/v1/droplets/later").json()["event"] is not None
            other = wait(store, ids["other"], "the other attempt", lambda m: m.state is S.RUNNING, log)
            assert other.claimed_by == "w1"
            hv.finish_now(f"{ids['other']}.1")
            wait(store, ids["other"], "the other migration", lambda m: m.state is S.COMPLETED, log)

            signalled = time.monotonic()
            stop(w1, timeout_s=30)
            took_s = time.monotonic() - signalled
        finally:
            stop(w1)
        assert w1.returncode == 0, log.read_text()[-4000:]
        assert took_s < SIGTERM_BOUND_S, log.read_text()[-4000:]
        stuck = store.get_migration(ids["stuck"])
        assert stuck.state is S.RUNNING and stuck.claimed_by is None  # handed over
        assert any(e.kind == "release" for e in store.migration_log(stuck.id))

        hv.hang("stuck", False)
        w2 = start_worker(
            WorkerSpec(db=url, hv_dir=str(hv.root), name="w2", duration_s=2.0, lease="60s", renew_every="1s"),
            log,
        )
        try:
            started = time.monotonic()
            done = wait(store, ids["stuck"], "w2 to finish it", lambda m: m.state is S.COMPLETED, log)
            recovered_s = time.monotonic() - started
        finally:
            stop(w2)
        assert recovered_s < 30  # at once, not after the 60 s lease
        assert done.attempt == 2
        assert hv.read()["droplets"]["stuck"]["switchovers"] == [f"{ids['stuck']}.2"]


def test_fleet_second_process_under_a_held_worker_name_is_refused(
    pg_server: pg.PostgresServer, tmp_path: Path
) -> None:
    url = pg_server.new_database()
    log = tmp_path / "workers.log"
    w1 = start_worker(WorkerSpec(db=url, hv_dir=str(tmp_path / "hv"), name="hv-a"), log)
    try:
        r = subprocess.run(
            [str(HOST_ENGINE_BIN), "--db", url, "run", "--worker", "hv-a", "--poll-interval", "200ms"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert w1.poll() is None  # the holder goes on
    finally:
        stop(w1)
    assert r.returncode == 4, (r.stdout, r.stderr)
    [line] = r.stderr.strip().splitlines()
    assert line.startswith(
        "host-engine: error: worker name 'hv-a' is held by another live host-engine process"
    )
    assert f"pid {w1.pid} on " in line
