"""Two workers on PostgreSQL writing the first row of the same simulated droplet at the same moment (found by
bench/fleet.py: ``engine step SimTickStep failed: store refused the change: duplicate key value violates
unique constraint "sim_droplets_pkey"``, which threw away that worker's whole tick).

The worker that loses the race must take it as what it is, another process changed the row first: its tick
goes on, its copy is dropped and read again, the row keeps the winner's state (docs/host-engine.md, "The simulated datacenter")."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import pytest

from host_engine import schema
from host_engine.drivers.sim import StoredWorld, codec, load_world
from host_engine.models import Droplet, Host
from host_engine.store import Store
from tests import pg

pytestmark = [pytest.mark.postgres]

GIB = 1024**3


pg_server = pg.pg_server


def test_sim_store_two_workers_creating_the_same_row_at_once_is_a_conflict_not_a_failed_tick(
    pg_server: pg.PostgresServer,
) -> None:
    url = pg_server.new_database()
    with Store.open(url) as store, Store.open(url) as other:
        for name in ("a", "b"):
            store.add_host(Host(name, "nyc1", 64, 512 * GIB, 20_000 * GIB, hypervisor_uri=f"sim://{name}"))
        store.add_droplet(Droplet("d1", "a", 1, GIB, 4 * GIB, addresses=("10.0.0.1",)))

        mine = StoredWorld.open(store)
        mine.droplets["d1"].throttle_pct = 30  # no row yet: this persist inserts it
        theirs = StoredWorld.open(other)
        theirs.droplets["d1"].throttle_pct = 10
        doc = codec.droplet_to_dict(theirs.droplets["d1"])

        errors: list[BaseException] = []

        def persist() -> None:
            try:
                mine.persist()
            except BaseException as e:
                errors.append(e)

        # The other worker's insert is in flight (not committed) when this one checks for a row and inserts.
        with other.engine.connect() as conn:
            tx = conn.begin()
            conn.execute(
                schema.sim_droplets.insert().values(
                    droplet_id="d1", power_state="running", doc=doc, rev=1, updated_at=datetime.now(UTC)
                )
            )
            t = threading.Thread(target=persist)
            t.start()
            time.sleep(1.0)  # this worker's insert now waits on the other's uncommitted row
            tx.commit()
        t.join(30)
        assert not t.is_alive()

        assert errors == []
        assert mine.writes.conflicts == 1
        assert load_world(store).droplets["d1"].throttle_pct == 10  # the winner's row is kept
        assert mine.droplets["d1"].throttle_pct == 10  # this worker's copy was dropped and read again
