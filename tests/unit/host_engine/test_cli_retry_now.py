"""``migrate --now`` after a failed attempt: the retry comes seconds later, not minutes (issue 11.6), still
to another host when the target was at fault, and still within ``max_attempts``. Through the real CLI on the
simulated hypervisor; the fake clock the sim follows says how long the operator would have waited."""

from __future__ import annotations

from host_engine.drivers.sim import StoredWorld
from host_engine.retry import NOW_BACKOFF_MAX_S
from host_engine.states import MigrationState
from host_engine.store import Store
from tests.unit.host_engine.cli_run import invoke
from tests.unit.host_engine.conftest import FakeClock, wall
from tests.unit.host_engine.fake_admin import FakeAdmin

S = MigrationState


def crash(db: str, *hosts: str) -> None:
    """Take simulated hosts down: a migration to one fails to prepare, blaming the target."""
    store = Store.open(db)
    world = StoredWorld.open(store)
    for h in hosts:
        world.host(h).alive = False
    world.persist()
    store.close()


def test_migrate_now_retries_within_seconds_on_another_host(
    db: str, clock: FakeClock, admin: FakeAdmin
) -> None:
    crash(db, "hv2")
    r = invoke(db, clock, "migrate", "web1", "--to", "hv2", "--now", "--unsafe-short-notice")
    assert r.exit_code == 0, (r.output, r.stderr)
    assert "completed: web1 now runs on hv3" in r.output.splitlines()[-1], r.output
    store = Store.open(db)
    [m] = store.list_migrations()
    log = store.migration_log(m.id)
    store.close()
    assert (m.state, m.attempt, m.target_host) == (S.COMPLETED, 2, "hv3")
    failed_at = next(e.at for e in log if e.to_state is S.FAILED)
    second_at = [e.at for e in log if e.to_state is S.RUNNING][1]
    waited_s = (second_at - failed_at).total_seconds()
    # The default backoff is 2 min (+-20 %); under --now a few seconds, jittered, at most the --now cap.
    assert 1 <= waited_s <= NOW_BACKOFF_MAX_S, waited_s


def test_migrate_now_still_gives_up_after_max_attempts_without_waiting_minutes(
    db: str, clock: FakeClock, admin: FakeAdmin
) -> None:
    crash(db, "hv2", "hv3")  # every target fails: three attempts, then the offline path
    started = wall(clock)
    r = invoke(db, clock, "migrate", "web1", "--now", "--unsafe-short-notice")
    assert r.exit_code != 0
    assert "ended offline_required" in r.stderr, r.stderr
    store = Store.open(db)
    [m] = store.list_migrations()
    store.close()
    assert (m.state, m.attempt) == (S.OFFLINE_REQUIRED, m.max_attempts)
    assert store_host(db, "web1") == "hv1"
    # Two retries' backoff, not 2 + 4 minutes.
    assert wall(clock) - started < 60, wall(clock) - started


def store_host(db: str, droplet_id: str) -> str:
    store = Store.open(db)
    try:
        return store.get_droplet(droplet_id).host
    finally:
        store.close()
