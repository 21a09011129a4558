"""``migrate --now`` beside a ``host-engine run``: the worker may claim the new migration's notice first (it
is due at once). CI saw ``migrate --now`` give up at once ("its notice could not be sent (not due yet)") while
the worker was sending it. It waits for the worker's send to end, then drives or follows the migration."""

from __future__ import annotations

import threading
import time

import pytest

from host_engine.cli import Deps
from host_engine.cli.migrate_now import run_now
from host_engine.metadata.notices import NoticeSender
from host_engine.metadata.reconcile import MetadataSync, default_client_factory
from host_engine.states import MigrationState
from host_engine.store import Store
from tests.unit.host_engine.cli_run import invoke
from tests.unit.host_engine.fake_admin import FakeAdmin

from .conftest import FakeClock


def test_migrate_now_waits_while_another_worker_holds_its_notice(
    db: str, clock: FakeClock, admin: FakeAdmin, capsys: pytest.CaptureFixture[str]
) -> None:
    r = invoke(db, clock, "migrate", "web1", "--to", "hv2", "--start", "+0s", "--notice", "0s",
               "--unsafe-short-notice")  # fmt: skip
    assert r.exit_code == 0, r.output
    store = Store.open(db, clock=clock)
    [planned] = store.list_migrations()
    # A run worker ("wb") claims the notice first, then gives the claim back after a second (as it does when
    # its send fails); --now must neither give up nor send it while the worker holds it.
    other = NoticeSender(
        store, MetadataSync(store, default_client_factory(attempts=1)), "wb", poll_interval_s=1.0
    )
    batch, _ = other.claim()
    assert [m.id for m, _d, _h in batch] == [planned.id]
    released = threading.Timer(1.0, other.release, args=(planned.id,))
    released.start()
    deps = Deps(
        db=db,
        clock=clock,
        user="tester",
        install_signals=False,
        sleep=time.sleep,  # wall time: the other worker's claim is given back on a real timer
        client_factory=default_client_factory(attempts=1, sleep=lambda s: None),
    )
    started = time.monotonic()
    try:
        run_now(deps, planned, "sim", 1000.0, False)
    finally:
        released.cancel()
        deps.close()
    assert time.monotonic() - started >= 0.9  # it waited for the claim
    assert "completed: web1 now runs on hv2" in capsys.readouterr().out.splitlines()[-1]
    m = store.get_migration(planned.id)
    store.close()
    assert (m.state, m.attempt) == (MigrationState.COMPLETED, 1)
