"""The controller's downtime ramp: QEMU gets a small downtime limit first, raised toward the budget only when
the memory rounds stop shrinking the remainder (host_engine.controller.next_downtime)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from host_engine.config import load_config
from host_engine.controller import (
    ControllerConfig,
    ControllerState,
    DowntimeStage,
    GiB,
    MiB,
    SetMaxDowntime,
    SetMemoryThrottle,
    Switchover,
    decide,
    downtime_steps,
    initial_downtime_ms,
)
from host_engine.drivers.base import Phase, Progress
from host_engine.drivers.sim import WORKLOADS
from host_engine.drivers.sim.model import SWITCHOVER_OVERHEAD_MS
from host_engine.errors import ConfigError
from tests.unit.host_engine.test_sim import make

NO_RAMP = ControllerConfig(initial_downtime_ms=ControllerConfig().max_downtime_ms)


def memory_round(round_: int, left: int, *, rate: float, dirty: float = 0.0, at_s: float = 10.0) -> Progress:
    """A memory-phase snapshot: ``left`` bytes to copy in ``round_`` at ``rate``, the guest dirtying ``dirty``."""
    return Progress(
        phase=Phase.MEMORY,
        elapsed_s=at_s,
        round=round_,
        disk_total_bytes=8 * GiB,
        disk_processed_bytes=8 * GiB,
        disk_remaining_bytes=0,
        memory_total_bytes=4 * GiB,
        memory_processed_bytes=4 * GiB - left,
        memory_remaining_bytes=left,
        disk_dirty_rate_bps=0.0,
        memory_dirty_rate_bps=dirty,
        transfer_rate_bps=rate,
        bytes_transferred=int(at_s * rate),
    )


def limits_handed_out(snapshots: list[Progress], cfg: ControllerConfig) -> tuple[list[int], ControllerState]:
    state = ControllerState()
    limits = []
    for p in snapshots:
        d = decide(p, cfg, state)
        state = d.state
        limits += [a.ms for a in d.actions if isinstance(a, SetMaxDowntime)]
    return limits, state


# --- in the simulator: what the operator sees ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["idle", "web", "log_writer", "cache", "database"])
def test_ramp_light_guest_switches_over_within_the_small_first_limit_not_the_budget(name: str) -> None:
    """QEMU switches over by itself once the RAM left fits its limit: handed the whole budget at once it
    takes whatever the first pass left (a pause near the budget); the ramp makes it wait for a remainder
    that fits the first, small limit, for a few rounds more."""
    cfg = ControllerConfig()
    ramped, _ = make(WORKLOADS[name]()).run(cfg)
    whole, _ = make(WORKLOADS[name]()).run(NO_RAMP)
    assert ramped.converged and whole.converged
    assert ramped.downtime_ms is not None and whole.downtime_ms is not None
    assert ramped.downtime_ms <= initial_downtime_ms(cfg) + SWITCHOVER_OVERHEAD_MS + 50
    assert ramped.downtime_ms < whole.downtime_ms / 2
    # The price: a few more rounds, a few percent more bytes.
    assert ramped.bytes_transferred <= whole.bytes_transferred * 1.1


# --- the policy, snapshot by snapshot --------------------------------------------------------------------------


def test_ramp_holds_the_first_limit_while_rounds_halve_the_remainder() -> None:
    """4 GiB halving each round at 1 GiB/s, until it fits the 50 ms (40 MiB planned) in round 8."""
    cfg = ControllerConfig()
    rate = 1.0 * GiB
    rounds = [memory_round(r, (4 * GiB) >> (r - 1), rate=rate, dirty=rate / 2, at_s=r) for r in range(1, 9)]
    limits, state = limits_handed_out(rounds, cfg)
    assert limits == []
    assert state.downtime.stage is DowntimeStage.INITIAL


def test_ramp_a_hot_set_rewritten_every_round_gets_the_limit_it_needs_at_once() -> None:
    """A 64 MiB hot set at 1 GiB/s (QEMU reads it as dirtying about as fast as the link moves): the remainder
    needs ~78 ms with the safety margin, so the 100 ms step, as soon as round 2 shows the dirty set."""
    cfg = ControllerConfig()
    rate = 1.0 * GiB
    rounds = [memory_round(1, 4 * GiB, rate=rate)]
    rounds += [memory_round(2, 64 * MiB, rate=rate, dirty=rate, at_s=10 + t / 4) for t in range(1, 4)]
    limits, state = limits_handed_out(rounds, cfg)
    assert limits == [100]
    assert state.downtime.stage is DowntimeStage.RAISED
    # Not taken at 100 ms either (QEMU measured the link slower): the next round goes one step up.
    limits, state = limits_handed_out(
        [*rounds, memory_round(3, 64 * MiB, rate=rate, dirty=rate, at_s=11)], cfg
    )
    assert limits == [100, 200]


def test_ramp_without_a_dirty_rate_raises_once_a_round_fails_to_shrink() -> None:
    cfg = ControllerConfig()
    rate = 32.0 * MiB
    rounds = [memory_round(1, 100 * MiB, rate=rate, at_s=1), memory_round(2, 8 * MiB, rate=rate, at_s=4)]
    rounds += [memory_round(3, 8 * MiB, rate=rate, at_s=4.3)]
    limits, state = limits_handed_out(rounds, cfg)
    # 8 MiB at 32 MiB/s: 250 ms, 312 ms with the safety margin: beyond every step but the budget.
    assert limits == [cfg.max_downtime_ms]
    assert state.downtime.stage is DowntimeStage.BUDGET


def test_ramp_raises_when_the_hypervisor_does_not_take_a_remainder_that_fits() -> None:
    """Two rounds that each started within 50 ms by our measure, and no switchover: QEMU measures the link
    slower; one step up, not the budget."""
    cfg = ControllerConfig()
    rate = 1.0 * GiB
    rounds = [memory_round(1, 4 * GiB, rate=rate)]
    rounds += [memory_round(r, 10 * MiB, rate=rate, at_s=10 + r) for r in (2, 3)]
    limits, _ = limits_handed_out(rounds, cfg)
    assert limits == [100]


@given(
    st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=3),  # rounds advanced since the last snapshot
            st.integers(min_value=0, max_value=8 * GiB),  # remainder
            st.floats(min_value=0, max_value=4 * GiB, allow_nan=False),  # transfer rate
            st.floats(min_value=0, max_value=4 * GiB, allow_nan=False),  # dirty rate
            st.sampled_from([0, 0, 30, 80]),  # throttle
        ),
        max_size=40,
    ),
    st.integers(min_value=10, max_value=2000),
    st.integers(min_value=10, max_value=2000),
)
def test_ramp_only_rises_stays_on_its_steps_and_never_switches_beyond_the_limit_in_force(
    snaps: list[tuple[int, int, float, float, int]], budget: int, first: int
) -> None:
    cfg = ControllerConfig(max_downtime_ms=budget, initial_downtime_ms=first)
    state = ControllerState()
    limit = initial_downtime_ms(cfg)
    round_ = 1
    for i, (advance, left, rate, dirty, throttle) in enumerate(snaps):
        round_ += advance
        p = replace(
            memory_round(round_, left, rate=rate, dirty=dirty, at_s=float(i)), memory_throttle_pct=throttle
        )
        d = decide(
            p, replace(cfg, stall_timeout_s=1e9, timeout_floor_s=1e9, no_transfer_timeout_s=1e9), state
        )
        for action in d.actions:
            if isinstance(action, SetMaxDowntime):
                assert limit < action.ms <= budget
                assert action.ms in downtime_steps(cfg)
                limit = action.ms
            if isinstance(action, Switchover):
                # Never a remainder the hypervisor would not have taken by itself at the limit it has.
                assert left == 0 or left <= rate * limit / 1000 * cfg.switchover_safety
        state = d.state
        assert state.downtime.limit(cfg) == limit


# --- configuration -----------------------------------------------------------------------------------------------


def test_ramp_first_limit_is_configurable_and_bounded_by_the_budget(tmp_path: Path) -> None:
    path = tmp_path / "engine.toml"
    path.write_text("[controller]\nmax_downtime_ms = 400\ninitial_downtime_ms = 80\n")
    ctl = load_config(path).controller
    assert (ctl.max_downtime_ms, ctl.initial_downtime_ms) == (400, 80)
    assert downtime_steps(ctl) == (80, 160, 320, 400)
    path.write_text("[controller]\nmax_downtime_ms = 100\ninitial_downtime_ms = 200\n")
    with pytest.raises(
        ConfigError, match=r"initial_downtime_ms: must be within 10\.\.max_downtime_ms \(100\)"
    ):
        load_config(path)


def test_no_throttle_while_the_rounds_shrink_by_a_third_whatever_the_rates_predict() -> None:
    """A guest streaming 32 MiB/s at a 48 MiB/s cap, its transfer rate read low (averaged over a window that
    began before the memory phase): the rates say it dirties 85 % of what is sent, the rounds show each
    starting with two thirds of the one before. Measured before: throttled to 40 % while converging alone."""
    cfg = ControllerConfig()
    rate = 40.0 * MiB
    state = ControllerState()
    throttles = []
    left = 100 * MiB
    for r in range(1, 9):
        dirty = 0.0 if r < 3 else 0.85 * rate  # QEMU's first dirty-rate sample comes after round 2 began
        p = memory_round(r, left, rate=rate, dirty=dirty, at_s=2.0 + r)
        d = decide(p, cfg, state)
        state = d.state
        throttles += [a.percent for a in d.actions if isinstance(a, SetMemoryThrottle)]
        left = left * 2 // 3
    assert throttles == []


def test_ramp_holds_the_first_limit_while_rounds_after_the_first_pass_shrink_by_a_third() -> None:
    """The memory-stream guest at its cap (32 MiB/s dirtied through 96 MiB, 48 MiB/s sent), its transfer rate
    read low (averaged over 8 s from before the memory phase): the rates say it dirties 85 % of what is sent,
    the rounds show each starting with two thirds of the one before. Measured before (docs/benchmarks.md,
    memory stream capped): the limit went to the 300 ms budget although the rounds converged alone."""
    cfg = ControllerConfig()
    rate = 40.0 * MiB
    rounds = []
    left = 96 * MiB
    for r in range(1, 12):
        dirty = 0.0 if r < 3 else 0.85 * rate  # QEMU's first dirty-rate sample comes after round 2 began
        rounds += [memory_round(r, left, rate=rate, dirty=dirty, at_s=2.0 + r + t / 4) for t in range(2)]
        left = left * 2 // 3
    limits, state = limits_handed_out(rounds, cfg)
    assert limits == []
    assert state.downtime.stage is DowntimeStage.INITIAL


def test_ramp_still_raises_when_a_later_round_stops_shrinking() -> None:
    """Round 3 shrank by a third against round 2 (held), round 4 hardly against round 3 (a hot set): the
    observed shrink holds the limit only while it lasts."""
    cfg = ControllerConfig()
    rate = 40.0 * MiB
    starts = [96 * MiB, 30 * MiB, 20 * MiB, 19 * MiB]
    rounds = [
        memory_round(r, left, rate=rate, dirty=0.0 if r < 3 else 0.85 * rate, at_s=2.0 + r)
        for r, left in enumerate(starts, 1)
    ]
    limits, _ = limits_handed_out(rounds, cfg)
    # 19 MiB at 40 MiB/s: 475 ms, beyond every step: the budget, in round 4, not before.
    assert limits == [cfg.max_downtime_ms]
    early, _ = limits_handed_out(rounds[:3], cfg)
    assert early == []


# The memory-stream guest at its 48 MiB/s cap on the real harness (14:21 UTC run), memory phase, tick by tick:
# (elapsed s, QEMU's round, the driver's memory-left bound MiB, transfer rate MiB/s as the driver now reads it
# (the set-up before the first byte left out), QEMU's dirty rate MiB/s). The bound reads round 2 as the first
# pass (it is the larger of this round's and the last round's first samples).
STREAM_AT_CAP = [
    (6.48, 1, 116.9, 48.0, 0.0),
    (7.51, 1, 116.9, 49.4, 0.0),
    (8.27, 1, 116.9, 48.2, 0.0),
    (8.53, 2, 116.9, 48.7, 32.2),
    (8.80, 2, 116.9, 47.8, 32.2),
    (9.31, 2, 116.9, 47.7, 32.2),
    (9.56, 3, 51.3, 48.2, 31.7),
    (10.09, 3, 51.3, 47.9, 31.7),
    (10.35, 4, 38.6, 48.3, 31.7),
    (10.86, 5, 26.6, 48.2, 32.4),
    (11.11, 6, 18.5, 47.8, 32.4),
    (11.37, 7, 17.7, 48.2, 32.4),
]


def test_real_capped_stream_is_not_throttled_and_keeps_the_first_limit_while_its_rounds_shrink() -> None:
    """Measured before: QEMU's limit raised to 300 ms at round 2's first sample, in every traced run, although
    the rounds then shrank by a third each and the guest converged alone. (Round 7's bound, 17.7 against
    18.5 MiB, shows no shrink: the limit may rise there; the bound lags a round, see docs/libvirt.md.)"""
    cfg = ControllerConfig()
    state = ControllerState()
    raised_in: list[int] = []
    throttles: list[int] = []
    for at_s, round_, left_mib, rate_mib, dirty_mib in STREAM_AT_CAP:
        p = memory_round(round_, int(left_mib * MiB), rate=rate_mib * MiB, dirty=dirty_mib * MiB, at_s=at_s)
        d = decide(p, cfg, state)
        state = d.state
        raised_in += [round_ for a in d.actions if isinstance(a, SetMaxDowntime)]
        throttles += [a.percent for a in d.actions if isinstance(a, SetMemoryThrottle)]
    assert throttles == []
    assert all(r >= 7 for r in raised_in), raised_in


def test_no_pause_in_the_tick_that_raises_the_limit() -> None:
    """The 8 MiB hot set at a 32 MiB/s cap on the real harness: round 4 started with what round 3 did (4.8 MiB),
    so the limit goes to 200 ms. Paused by the controller in that same tick, QEMU sent the remainder at the cap
    (131-178 ms downtime against 28-43 ms for the baselines, which QEMU switched by itself at line rate)."""
    cfg = ControllerConfig()
    rounds = [
        memory_round(1, int(123.3 * MiB), rate=29.4 * MiB, at_s=6.85),
        memory_round(2, int(123.3 * MiB), rate=30.2 * MiB, at_s=7.10),
        memory_round(3, int(4.8 * MiB), rate=29.7 * MiB, at_s=7.36),
        memory_round(4, int(4.8 * MiB), rate=30.4 * MiB, at_s=7.61),
    ]
    state = ControllerState()
    for p in rounds:
        d = decide(p, cfg, state)
        state = d.state
    assert [type(a) for a in d.actions] == [SetMaxDowntime]
    # The next tick, if QEMU has not switched by then, the controller may pause (within the new limit).
    later = decide(memory_round(4, int(4.8 * MiB), rate=30.4 * MiB, at_s=7.86), cfg, state)
    assert any(isinstance(a, Switchover) for a in later.actions)
