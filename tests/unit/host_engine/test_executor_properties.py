"""Property: for any workload and any fault at any phase, after every attempt the droplet runs on exactly one
host, the store and the simulated hypervisor agree on which, the data was equal at switchover, and the
metadata servers show what the store says (the executor's hooks are the real ``MetadataSync``)."""

from __future__ import annotations

import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import responses
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from host_engine.controller import GiB
from host_engine.drivers.base import DomainState
from host_engine.drivers.sim import (
    FAULT_PHASES,
    WORKLOADS,
    Fault,
    FaultKind,
    SimClock,
    SimHypervisor,
    SimWorld,
)
from host_engine.executor import Executor, ExecutorConfig, Finished, attempt_id
from host_engine.metadata.reconcile import MetadataSync, default_client_factory, desired_event
from host_engine.models import Droplet, Host, NewMigration
from host_engine.states import MigrationState as S
from host_engine.store import Store
from tests.unit.host_engine.fake_admin import FakeAdmin

T0 = datetime(2026, 12, 1, 2, 0, tzinfo=UTC)
HOSTS = ("a", "b", "c")
GIVE_UP_STATES = (S.COMPLETED, S.OFFLINE_REQUIRED, S.CANCELLED)

faults = st.lists(
    st.builds(
        Fault,
        kind=st.sampled_from(FaultKind),
        phase=st.sampled_from(FAULT_PHASES),
        after_s=st.floats(min_value=0, max_value=8),
        duration_s=st.none() | st.floats(min_value=0, max_value=30),
    ),
    max_size=3,
)


def check_consistent(store: Store, world: SimWorld, servers: dict[str, FakeAdmin], f: Finished) -> None:
    m = store.get_migration(f.migration_id)
    d = world.droplets["d1"]
    assert world.hosts_holding("d1") == [d.host]
    assert store.get_droplet("d1").host == d.host
    assert d.throttle_pct == 0
    assert d.disk_limit_bps is None
    sim_attempt = world.migrations.get(attempt_id(m.id, f.attempt))
    if m.state is S.COMPLETED:
        assert d.host == m.target_host
        assert sim_attempt is not None
        assert sim_attempt.verified is True
        assert "d1" in servers[m.target_host].droplets
        assert servers[m.target_host].event("d1") is None
        assert "d1" not in servers[m.source_host].droplets
        return
    assert d.host == m.source_host
    assert d.state is DomainState.RUNNING
    want = desired_event(m)
    shown = servers[m.source_host].event("d1")
    assert want is not None
    assert shown is not None
    assert (shown["id"], shown["event"]) == (want.id, want.event)
    for h in HOSTS:
        if h != m.source_host:
            assert "d1" not in servers[h].droplets


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    workload=st.sampled_from(sorted(set(WORKLOADS) - {"diabolical"})),
    fault_list=faults,
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_executor_any_workload_any_faults_store_hypervisor_and_metadata_servers_agree(
    workload: str, fault_list: list[Fault], seed: int
) -> None:
    world = SimWorld(seed)
    with (
        tempfile.TemporaryDirectory() as tmp,
        responses.RequestsMock(assert_all_requests_are_fired=False) as rsps,
    ):
        token = Path(tmp) / "token"
        token.write_text("s3cret")
        servers = {h: FakeAdmin(f"http://md-{h}.test/") for h in HOSTS}
        for fa in servers.values():
            fa.install(rsps)
        store = Store.open(Path(tmp) / "e.db", clock=lambda: T0 + timedelta(seconds=world.time_s))
        try:
            for h in HOSTS:
                world.add_host(h)
                store.add_host(
                    Host(
                        h,
                        "nyc1",
                        32,
                        128 * GiB,
                        2000 * GiB,
                        hypervisor_uri=f"sim://{h}",
                        metadata_url=servers[h].base_url,
                        metadata_token_file=str(token),
                    )
                )
            store.add_droplet(Droplet("d1", "a", 2, GiB, 4 * GiB, addresses=("10.0.0.9",)))
            world.add_droplet("d1", "a", memory_bytes=GiB, disk_bytes=4 * GiB, workload=WORKLOADS[workload]())
            sync = MetadataSync(store, default_client_factory(attempts=1, sleep=lambda s: None))
            (m,) = store.create_migrations([NewMigration("d1", "a", "b", T0, T0, T0 + timedelta(hours=2))])
            m = store.transition(m.id, S.NOTIFIED, notified_at=T0)
            sync.notify(m)
            for n, fault in enumerate(fault_list, start=1):
                world.inject_fault(attempt_id(m.id, n), fault)

            def choose(_m: object, avoid: frozenset[str]) -> str | None:
                return next((h for h in HOSTS if h not in avoid), None)

            ex = Executor(
                store,
                SimHypervisor(world),
                ExecutorConfig(worker="w1"),
                SimClock(world),
                hooks=sync,
                choose_target=choose,
                rand=lambda: 0.5,
            )
            clock = SimClock(world)
            for _ in range(20_000):
                for f in ex.tick():
                    event(f"attempt ended: {f.result.outcome.value} -> {f.state.value}")
                    check_consistent(store, world, servers, f)
                if store.get_migration(m.id).state in GIVE_UP_STATES:
                    break
                clock.sleep(0.5 if ex.active else 30.0)
            final = store.get_migration(m.id)
            assert final.state in GIVE_UP_STATES
            if final.state is S.OFFLINE_REQUIRED:
                assert servers[final.source_host].event("d1")["event"] == "offline_migrate"  # type: ignore[index]
            sync.close()
        finally:
            store.close()
