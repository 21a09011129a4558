"""SIGTERM to a ``host-engine run --driver sim`` worker that is busy simulating, on a real PostgreSQL.

At a high ``--sim-speed`` one engine tick of the simulated datacenter can last seconds. Stopping must still
end every running attempt once, as the worker's own shutdown ("worker shutting down", source untouched,
the migration back on the retry path for the next worker at once), not have the shutdown and the tick in
progress drive the same attempts side by side: that recorded attempts twice ("claimed by None"), failed
them as "aborted" or "was not prepared", and made the worker conflict with its own simulated rows. Seen in
``bench/fleet.py`` at every run's end. The process also exits within the 10 s SIGTERM bound.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from host_engine.drivers.sim import load_world
from host_engine.models import Droplet
from host_engine.states import MigrationState as S
from host_engine.store import Store
from tests import pg
from tests.fleet import GIB, add_hosts, notified_migration, start_run
from tests.servers import MetadataServer

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

pg_server = pg.pg_server

DROPLETS = 8
WAIT_S = 60.0
SIGTERM_BOUND_S = 10.0
# Every attempt at once (the limits are not what this test is about).
SETS = ("--set", "concurrency.max_parallel=16", "--set", "concurrency.max_per_source=16",
        "--set", "concurrency.max_per_target=16", "--set", "engine.max_concurrent=16")  # fmt: skip
# Wrong outcomes of a worker's own shutdown (each seen before the fix).
BAD = ("outcome not recorded", "claimed by None", "was not prepared", "failed: aborted",
       "changed in another process", "Traceback")  # fmt: skip


def test_sigterm_during_a_long_sim_tick_stops_each_attempt_once(
    pg_server: pg.PostgresServer, tmp_path: Path
) -> None:
    url = pg_server.new_database()
    log = tmp_path / "worker.log"
    with MetadataServer.start(tmp_path / "ms") as ms, Store.open(url) as store:
        add_hosts(store, ("hv1", "hv2", "hv3"), scheme="sim", metadata=ms)
        now = store.now()
        with store.begin() as tx:
            for i in range(DROPLETS):
                # 2 TiB each: minutes of copying even at the simulator's top speed, so all are still
                # running when the signal comes.
                droplet = Droplet(f"big{i}", "hv1", 2, 2 * GIB, 2048 * GIB, addresses=(f"127.0.9.{i + 1}",))
                notified_migration(tx, droplet, f"hv{2 + i % 2}", now)
        proc = start_run(url, "w1", log, "--driver", "sim", "--sim-speed", "2000", "--poll-interval", "100ms",
                         settings=SETS)  # fmt: skip
        try:
            deadline = time.monotonic() + WAIT_S
            while sum(m.state is S.RUNNING for m in store.list_migrations()) < DROPLETS:
                assert proc.poll() is None, log.read_text()[-4000:]
                assert time.monotonic() < deadline, log.read_text()[-4000:]
                time.sleep(0.2)
            time.sleep(4.0)  # long ticks by now: the simulation cannot keep up with 2000x
            assert proc.poll() is None, log.read_text()[-4000:]
            stopped = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            proc.wait(SIGTERM_BOUND_S + 20)
            took = time.monotonic() - stopped
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        text = log.read_text()
        assert took < SIGTERM_BOUND_S, f"took {took:.1f} s\n{text[-4000:]}"
        for bad in BAD:
            assert bad not in text, f"{bad!r} in the worker's log:\n{text[-6000:]}"
        for m in store.list_migrations():
            # Each attempt ended exactly once, as the worker's shutdown: back to be retried at once, or
            # (a copy that happened to finish) completed. Nothing left running under the worker's claim.
            assert m.state in (S.NOTIFIED, S.COMPLETED), (m.id, m.state, m.last_error)
            assert m.attempt == 1, (m.id, m.attempt)
            if m.state is S.NOTIFIED:
                assert m.last_error == "worker shutting down", (m.id, m.last_error)
                assert m.claimed_by is None
        world = load_world(store)
        for d in store.list_droplets():
            assert world.hosts_holding(d.id) == [d.host], d.id
