"""The simulated hypervisor driven by the real controller loop: every workload, every fault, every phase."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from host_engine.attempt import MigrationResult, MigrationRun, Outcome, run_concurrently, run_migration
from host_engine.controller import ControllerConfig, GiB, MiB
from host_engine.drivers.base import DomainState, HypervisorDriver, MigrationDriver, MigrationSpec, Phase
from host_engine.drivers.sim import (
    DEFAULT_NIC_BPS,
    FAULT_PHASES,
    WORKLOADS,
    Fault,
    FaultKind,
    HostModel,
    Pattern,
    SimClock,
    SimHypervisor,
    SimMigrationDriver,
    SimWorld,
    Workload,
    database,
    diabolical,
    world_from_dict,
    world_from_json,
    world_to_dict,
    world_to_json,
)
from host_engine.drivers.sim.model import SWITCHOVER_OVERHEAD_MS

MEMORY = 4 * GiB
DISK = 32 * GiB


@dataclass
class Setup:
    world: SimWorld
    hv: SimHypervisor
    spec: MigrationSpec

    @property
    def driver(self) -> SimMigrationDriver:
        return self.hv.migration(self.spec)

    def run(self, config: ControllerConfig | None = None) -> tuple[MigrationResult, SimMigrationDriver]:
        driver = self.driver
        return run_migration(driver, config or ControllerConfig(), SimClock(self.world)), driver


def make(
    workload: Workload,
    *,
    seed: int = 7,
    memory: int = MEMORY,
    disk: int = DISK,
    hosts: tuple[str, ...] = ("src", "dst"),
    state: DomainState = DomainState.RUNNING,
    offline: bool = False,
    power_on_after: bool = True,
    background_mirror: bool = False,
) -> Setup:
    world = SimWorld(seed)
    if background_mirror:  # libvirt's background disk mirror, not the write-blocking one (the default)
        world.default_host_model = HostModel(sync_disk_writes=False)
    for h in hosts:
        world.add_host(h)
    world.add_droplet("d1", "src", memory_bytes=memory, disk_bytes=disk, workload=workload, state=state)
    spec = MigrationSpec(
        "m1", "d1", "src", "dst", "sim://src", "sim://dst", 1, memory, disk, offline, power_on_after
    )
    return Setup(world, SimHypervisor(world), spec)


def assert_runs_on_exactly(world: SimWorld, host: str) -> None:
    d = world.droplets["d1"]
    assert d.host == host
    assert world.hosts_holding("d1") == [host]
    assert d.throttle_pct == 0
    assert d.disk_limit_bps is None


def assert_source_untouched(s: Setup, result: MigrationResult) -> None:
    assert result.outcome is not Outcome.COMPLETED
    assert_runs_on_exactly(s.world, "src")
    assert s.world.droplets["d1"].state is DomainState.RUNNING


def test_sim_drivers_satisfy_the_protocols() -> None:
    s = make(WORKLOADS["idle"]())
    assert isinstance(s.hv, HypervisorDriver)
    assert isinstance(s.driver, MigrationDriver)


@pytest.mark.parametrize("name", ["idle", "web", "log_writer"])
def test_sim_light_workloads_converge_without_throttle_and_target_equals_source(name: str) -> None:
    s = make(WORKLOADS[name]())
    result, driver = s.run()
    assert result.outcome is Outcome.COMPLETED, result.reason
    assert driver.verified is True
    assert result.throttle_pct_s == 0
    assert result.disk_limit_s == 0
    assert result.downtime_ms is not None
    # QEMU switches over by itself once the RAM left fits its limit at the rate it measures: the pause is
    # that plus the switchover's fixed cost and the disk mirror's flush (a few steps of disk writes).
    assert result.downtime_ms <= ControllerConfig().max_downtime_ms + SWITCHOVER_OVERHEAD_MS + 50
    assert_runs_on_exactly(s.world, "dst")
    # Every byte crossed at least once: disk + memory.
    assert result.bytes_transferred >= DISK + MEMORY


def test_sim_database_gets_the_disk_limit_only_near_the_end_and_never_keeps_it() -> None:
    s = make(database(), background_mirror=True)
    result, driver = s.run()
    assert result.outcome is Outcome.COMPLETED, result.reason
    assert driver.verified is True
    assert result.disk_limit_s > 0
    cfg = ControllerConfig()
    trace = result.trace
    first = next(i for i, p in enumerate(trace) if p.disk_write_limit_bps is not None)
    before = trace[first - 1]
    assert before.disk_remaining_bytes <= before.transfer_rate_bps * cfg.disk_limit_window_s
    assert before.disk_dirty_rate_bps >= before.transfer_rate_bps * cfg.disk_fast_write_ratio
    assert before.disk_remaining_bytes < DISK / 4  # the tail, not the bulk copy
    assert trace[-1].phase is Phase.DONE
    assert_runs_on_exactly(s.world, "dst")


def test_sim_database_without_the_disk_limit_is_slower_or_throttled() -> None:
    with_limit, _ = make(database(), background_mirror=True).run()
    without, _ = make(database(), background_mirror=True).run(ControllerConfig(disk_limit_enabled=False))
    assert without.disk_limit_s == 0
    assert without.duration_s > with_limit.duration_s or without.throttle_pct_s > with_limit.throttle_pct_s


def test_sim_diabolical_fails_without_throttle_and_leaves_source_untouched_target_clean() -> None:
    s = make(diabolical(link_multiple=2))
    result, driver = s.run(ControllerConfig(throttle_max_pct=0))
    assert result.outcome is Outcome.ABORTED
    assert driver.verified is None
    assert_source_untouched(s, result)


def test_sim_diabolical_converges_with_the_stepped_throttle_when_throttling_can_win() -> None:
    s = make(diabolical(link_multiple=2))
    result, driver = s.run()
    assert result.outcome is Outcome.COMPLETED, result.reason
    assert driver.verified is True
    assert result.throttle_pct_s > 0
    assert max(p.memory_throttle_pct for p in result.trace) <= ControllerConfig().throttle_max_pct
    assert_runs_on_exactly(s.world, "dst")


def test_sim_diabolical_beyond_any_throttle_is_aborted_as_stalled() -> None:
    s = make(diabolical(link_multiple=5))
    result, _ = s.run()
    assert result.outcome is Outcome.ABORTED
    assert result.abort_reason is not None
    assert result.abort_reason.value == "not_converging"  # said from the rates, before any stall timer
    assert_source_untouched(s, result)


@pytest.mark.parametrize("phase", FAULT_PHASES, ids=lambda p: p.value)
@pytest.mark.parametrize("kind", list(FaultKind), ids=lambda k: k.value)
@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_sim_fault_at_any_phase_leaves_droplet_on_source_and_target_clean(
    name: str, kind: FaultKind, phase: Phase
) -> None:
    s = make(WORKLOADS[name](), memory=GiB, disk=8 * GiB)
    s.world.inject_fault("m1", Fault(kind, phase))
    result, _ = s.run()
    assert_source_untouched(s, result)
    fired = not s.world.migrations["m1"].faults
    if not fired:  # the workload never reached that phase (diabolical never switches over): plain abort
        assert result.outcome is Outcome.ABORTED
        assert name == "diabolical"
    elif kind is FaultKind.LINK_DROP:
        assert result.outcome in (Outcome.ABORTED, Outcome.FAILED)
        assert not result.target_at_fault
    else:
        assert result.outcome is Outcome.FAILED
        assert result.target_at_fault is (kind is FaultKind.TARGET_CRASH)


def test_sim_link_drop_during_switchover_resumes_the_source_within_the_switchover_timeout() -> None:
    s = make(WORKLOADS["web"](), memory=GiB, disk=8 * GiB)
    s.world.inject_fault("m1", Fault(FaultKind.LINK_DROP, Phase.SWITCHOVER))
    result, _ = s.run()
    assert result.abort_reason is not None
    assert result.abort_reason.value == "switchover_timeout"
    paused = [p for p in result.trace if p.phase is Phase.SWITCHOVER]
    assert len(paused) * 0.5 <= ControllerConfig().switchover_timeout_s + 0.5
    assert_source_untouched(s, result)


def test_sim_target_crash_then_retry_to_another_target_succeeds() -> None:
    s = make(WORKLOADS["web"](), hosts=("src", "dst", "dst2"))
    s.world.inject_fault("m1", Fault(FaultKind.TARGET_CRASH, Phase.MEMORY))
    first, _ = s.run()
    assert first.target_at_fault
    retry = MigrationSpec("m1.2", "d1", "src", "dst2", "sim://src", "sim://dst2", 1, MEMORY, DISK)
    second = run_migration(s.hv.migration(retry), ControllerConfig(), SimClock(s.world))
    assert second.outcome is Outcome.COMPLETED
    assert_runs_on_exactly(s.world, "dst2")
    # The crashed host comes back empty.
    s.world.restart_host("dst")
    assert s.world.hosts_holding("d1") == ["dst2"]


@pytest.mark.parametrize("power_on_after", [True, False])
def test_sim_offline_migration_copies_the_disk_and_restores_power_state(power_on_after: bool) -> None:
    s = make(WORKLOADS["database"](), state=DomainState.SHUT_OFF, offline=True, power_on_after=power_on_after)
    result, driver = s.run()
    assert result.outcome is Outcome.COMPLETED, result.reason
    assert driver.verified is True
    assert result.throttle_pct_s == 0
    assert result.disk_limit_s == 0
    assert DISK <= result.bytes_transferred < DISK + MiB * 64  # disk only, each block once
    expected = DomainState.RUNNING if power_on_after else DomainState.SHUT_OFF
    assert s.hv.domain_state("dst", "d1") is expected
    assert s.hv.domain_state("src", "d1") is DomainState.ABSENT


def test_sim_shut_off_droplet_refuses_a_live_migration() -> None:
    s = make(WORKLOADS["idle"](), state=DomainState.SHUT_OFF)
    result, _ = s.run()
    assert result.outcome is Outcome.FAILED
    assert "offline" in (result.reason or "")
    assert s.world.hosts_holding("d1") == ["src"]


def test_sim_is_deterministic_from_its_seed() -> None:
    a, _ = make(database(), seed=3).run()
    b, _ = make(database(), seed=3).run()
    assert a.summary() == b.summary()
    assert [p.memory_remaining_bytes for p in a.trace] == [p.memory_remaining_bytes for p in b.trace]


def test_sim_world_round_trips_through_json_mid_migration() -> None:
    s = make(database(), memory=GiB, disk=8 * GiB)
    driver = s.driver
    driver.prepare_target()
    driver.start()
    s.world.advance(4.0)
    copy = world_from_json(world_to_json(s.world))
    assert world_to_json(copy) == world_to_json(s.world)
    for w in (s.world, copy):
        w.advance(3.0)
    assert world_to_json(copy) == world_to_json(s.world)
    # And a finished migration continues in the restored world as in the original.
    results = [
        run_migration(SimHypervisor(w).migration(s.spec), ControllerConfig(), SimClock(w))
        for w in (s.world, copy)
    ]
    assert results[0].summary() == results[1].summary()


def test_sim_migrations_from_one_host_share_its_nic() -> None:
    def world_with(n: int) -> tuple[SimWorld, list[SimMigrationDriver]]:
        world = SimWorld(1)
        for h in ("src", "dst", "dst2"):
            world.add_host(h)
        drivers = []
        for i in range(n):
            world.add_droplet(f"d{i}", "src", memory_bytes=GiB, disk_bytes=8 * GiB)
            target = "dst" if i % 2 == 0 else "dst2"
            spec = MigrationSpec(f"m{i}", f"d{i}", "src", target, "", "", 1, GiB, 8 * GiB)
            drivers.append(SimHypervisor(world).migration(spec))
        return world, drivers

    world1, (only,) = world_with(1)
    alone = run_migration(only, ControllerConfig(), SimClock(world1))
    world2, pair = world_with(2)
    runs = [MigrationRun(d, ControllerConfig(), SimClock(world2)) for d in pair]
    together = run_concurrently(runs, SimClock(world2))
    assert all(r.outcome is Outcome.COMPLETED for r in together)
    # Two migrations through one source NIC each take about twice as long.
    for r in together:
        assert r.duration_s > 1.7 * alone.duration_s


def test_sim_recover_after_a_worker_died_mid_copy_returns_the_source() -> None:
    s = make(WORKLOADS["web"](), memory=GiB, disk=8 * GiB)
    driver = s.driver
    driver.prepare_target()
    driver.start()
    driver.set_memory_throttle(30)
    s.world.advance(3.0)
    # The worker is gone; a fresh process sees only the world.
    world = world_from_dict(world_to_dict(s.world))
    assert SimHypervisor(world).recover(s.spec) == "src"
    assert SimHypervisor(world).recover(s.spec) == "src"  # idempotent
    d = world.droplets["d1"]
    assert d.host == "src"
    assert d.state is DomainState.RUNNING
    assert world.hosts_holding("d1") == ["src"]
    assert d.throttle_pct == 0


def test_sim_recover_after_a_worker_died_past_switchover_keeps_the_target() -> None:
    s = make(WORKLOADS["idle"](), memory=GiB, disk=8 * GiB)
    driver = s.driver
    run = MigrationRun(driver, ControllerConfig(), SimClock(s.world))
    run.begin()
    while driver.progress().phase is not Phase.DONE:
        run.driver.progress()
        # Drive the controller but never reach the finalize step: the worker dies right after switchover.
        if run.step() is not None:
            pytest.fail("finished before the simulated crash")
        s.world.advance(0.5)
    assert s.world.hosts_holding("d1") == ["dst", "src"]
    assert s.hv.recover(s.spec) == "dst"
    assert_runs_on_exactly(s.world, "dst")


workloads = st.builds(
    Workload,
    name=st.just("random"),
    disk_rate_bps=st.floats(min_value=0, max_value=2 * GiB),
    disk_hot_bytes=st.integers(min_value=0, max_value=8 * GiB),
    disk_pattern=st.sampled_from(Pattern),
    memory_rate_bps=st.floats(min_value=0, max_value=4 * GiB),
    memory_hot_bytes=st.integers(min_value=0, max_value=GiB),
    memory_pattern=st.sampled_from(Pattern),
)
faults = st.none() | st.builds(
    Fault,
    kind=st.sampled_from(FaultKind),
    phase=st.sampled_from(FAULT_PHASES),
    after_s=st.floats(min_value=0, max_value=5),
    duration_s=st.none() | st.floats(min_value=0, max_value=30),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads, faults, st.integers(min_value=0, max_value=2**32))
def test_sim_any_workload_any_fault_droplet_ends_on_exactly_one_host_with_equal_data(
    workload: Workload, fault: Fault | None, seed: int
) -> None:
    s = make(workload, seed=seed, memory=GiB, disk=4 * GiB)
    if fault is not None:
        s.world.inject_fault("m1", fault)
    result, driver = s.run(ControllerConfig(timeout_floor_s=60, timeout_s_per_gib=10))
    d = s.world.droplets["d1"]
    assert s.world.hosts_holding("d1") == [d.host]
    assert d.throttle_pct == 0
    assert d.disk_limit_bps is None
    if result.outcome is Outcome.COMPLETED:
        assert d.host == "dst"
        assert driver.verified is True
        assert result.downtime_ms is not None
    else:
        assert d.host == "src"
        assert d.state is DomainState.RUNNING


def test_sim_a_target_crash_fails_every_migration_heading_there() -> None:
    world = SimWorld(2)
    for h in ("src", "dst"):
        world.add_host(h)
    drivers = []
    for i in range(2):
        world.add_droplet(f"d{i}", "src", memory_bytes=GiB, disk_bytes=8 * GiB)
        spec = MigrationSpec(f"m{i}", f"d{i}", "src", "dst", "", "", 1, GiB, 8 * GiB)
        drivers.append(SimHypervisor(world).migration(spec))
    world.inject_fault("m0", Fault(FaultKind.TARGET_CRASH, Phase.DISK, after_s=2))
    runs = [MigrationRun(d, ControllerConfig(), SimClock(world)) for d in drivers]
    results = run_concurrently(runs, SimClock(world))
    assert [r.outcome for r in results] == [Outcome.FAILED, Outcome.FAILED]
    assert all(r.target_at_fault for r in results)
    for i in range(2):
        assert world.hosts_holding(f"d{i}") == ["src"]
        assert world.droplets[f"d{i}"].state is DomainState.RUNNING


def test_sim_database_on_a_third_of_the_link_converges_with_the_last_resort_disk_limit() -> None:
    """Writing faster than its share of the link, its mirror never gets to "few blocks": the limit goes on
    after a stall window instead of an abort."""
    world = SimWorld(1)
    world.default_host_model = HostModel(sync_disk_writes=False)  # the background mirror: it can fall behind
    world.add_host("src", nic_bps=DEFAULT_NIC_BPS / 3)
    world.add_host("dst")
    world.add_droplet("d1", "src", memory_bytes=MEMORY, disk_bytes=DISK, workload=database())
    spec = MigrationSpec("m1", "d1", "src", "dst", "", "", 1, MEMORY, DISK)
    driver = SimHypervisor(world).migration(spec)
    result = run_migration(driver, ControllerConfig(), SimClock(world))
    assert result.outcome is Outcome.COMPLETED, result.reason
    assert driver.verified is True
    assert result.disk_limit_s > 0
    first = next(p for p in result.trace if p.disk_write_limit_bps is not None)
    assert first.disk_remaining_bytes > first.transfer_rate_bps * ControllerConfig().disk_limit_window_s
    assert world.droplets["d1"].disk_limit_bps is None


@pytest.mark.parametrize(("down_s", "survives"), [(5.0, True), (20.0, False)])
def test_sim_a_link_flap_shorter_than_the_no_transfer_timeout_is_ridden_out(
    down_s: float, survives: bool
) -> None:
    s = make(WORKLOADS["web"](), memory=GiB, disk=8 * GiB)
    s.world.inject_fault("m1", Fault(FaultKind.LINK_DROP, Phase.DISK, after_s=2, duration_s=down_s))
    result, driver = s.run()
    if survives:
        assert result.outcome is Outcome.COMPLETED, result.reason
        assert driver.verified is True
        assert_runs_on_exactly(s.world, "dst")
    else:
        assert result.abort_reason is not None
        assert result.abort_reason.value == "no_transfer"
        assert_source_untouched(s, result)


def test_sim_recover_of_an_attempt_that_never_reached_the_hypervisor_is_a_no_op() -> None:
    s = make(WORKLOADS["idle"](), memory=GiB, disk=8 * GiB)
    assert s.hv.recover(s.spec) == "src"
    assert_runs_on_exactly(s.world, "src")
