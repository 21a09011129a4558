"""The convergence controller's invariants, as properties over arbitrary progress snapshots."""

from __future__ import annotations

import doctest
from dataclasses import replace
from types import ModuleType
from typing import TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from host_engine import (
    controller,
    controller_config,
    controller_disk,
    controller_downtime,
    controller_throttle,
)
from host_engine.controller import (
    Abort,
    AbortReason,
    ControllerConfig,
    ControllerState,
    GiB,
    MiB,
    SetDiskWriteLimit,
    SetMemoryThrottle,
    Switchover,
    completion_timeout_s,
    decide,
)
from host_engine.drivers.base import Phase, Progress

ACTIVE = (Phase.DISK, Phase.MEMORY)
sizes = st.integers(min_value=0, max_value=200 * GiB)
rates = st.floats(min_value=0, max_value=4 * GiB, allow_nan=False)


@st.composite
def progresses(draw: st.DrawFn, phases: tuple[Phase, ...] = tuple(Phase)) -> Progress:
    disk_total = draw(sizes)
    mem_total = draw(st.integers(min_value=0, max_value=64 * GiB))
    disk_left = draw(st.integers(min_value=0, max_value=disk_total))
    mem_left = draw(st.integers(min_value=0, max_value=mem_total))
    step = ControllerConfig().throttle_step_pct
    return Progress(
        phase=draw(st.sampled_from(phases)),
        elapsed_s=draw(st.floats(min_value=0, max_value=20_000, allow_nan=False)),
        round=draw(st.integers(min_value=0, max_value=50)),
        disk_total_bytes=disk_total,
        disk_processed_bytes=disk_total - disk_left,
        disk_remaining_bytes=disk_left,
        memory_total_bytes=mem_total,
        memory_processed_bytes=mem_total - mem_left,
        memory_remaining_bytes=mem_left,
        disk_dirty_rate_bps=draw(rates),
        memory_dirty_rate_bps=draw(rates),
        transfer_rate_bps=draw(rates),
        disk_write_limit_bps=draw(st.none() | st.integers(min_value=MiB, max_value=GiB)),
        memory_throttle_pct=draw(st.integers(min_value=0, max_value=8)) * step,
        bytes_transferred=draw(st.integers(min_value=0, max_value=10**12)),
    )


@st.composite
def states(draw: st.DrawFn) -> ControllerState:
    return ControllerState(
        best_remaining_bytes=draw(st.none() | sizes),
        best_remaining_at_s=draw(st.floats(min_value=0, max_value=20_000, allow_nan=False)),
        last_bytes_transferred=draw(st.integers(min_value=0, max_value=10**12)),
        last_transfer_at_s=draw(st.floats(min_value=0, max_value=20_000, allow_nan=False)),
        throttle_raised_round=draw(st.integers(min_value=-1, max_value=50)),
    )


T = TypeVar("T")


def of_type(actions: tuple[object, ...], kind: type[T]) -> list[T]:
    return [a for a in actions if isinstance(a, kind)]


@pytest.mark.parametrize(
    "module", [controller, controller_config, controller_downtime, controller_disk, controller_throttle]
)
def test_controller_docstring_examples_hold(module: ModuleType) -> None:
    result = doctest.testmod(module)
    assert result.attempted >= 3
    assert result.failed == 0


@given(progresses(), states())
def test_controller_new_disk_limit_only_when_guest_writes_fast_and_few_blocks_left_or_stuck(
    p: Progress, s: ControllerState
) -> None:
    cfg = ControllerConfig()
    p = replace(p, disk_write_limit_bps=None)
    for action in of_type(decide(p, cfg, s).actions, SetDiskWriteLimit):
        assert action.bytes_per_s is not None
        assert p.phase in ACTIVE
        few_left = p.disk_remaining_bytes <= p.transfer_rate_bps * cfg.disk_limit_window_s
        # Or, as the last resort before a stall: no new low for a whole stall window.
        stuck = p.elapsed_s - s.best_remaining_at_s >= cfg.stall_timeout_s
        assert few_left or stuck
        assert p.disk_dirty_rate_bps >= p.transfer_rate_bps * cfg.disk_fast_write_ratio
        assert action.bytes_per_s >= cfg.disk_limit_floor_bps


@given(progresses(phases=(Phase.DONE, Phase.FAILED)), states())
def test_controller_lifts_every_limit_once_switchover_is_done_or_failed(
    p: Progress, s: ControllerState
) -> None:
    actions = decide(p, ControllerConfig(), s).actions
    if p.disk_write_limit_bps is not None:
        assert SetDiskWriteLimit(None) in actions
    if p.memory_throttle_pct:
        assert SetMemoryThrottle(0) in actions
    assert all(a in (SetDiskWriteLimit(None), SetMemoryThrottle(0)) for a in actions)


@given(progresses(), states(), st.integers(min_value=0, max_value=99), st.integers(min_value=1, max_value=50))
def test_controller_memory_throttle_is_stepped_bounded_and_never_stepped_down_mid_migration(
    p: Progress, s: ControllerState, max_pct: int, step: int
) -> None:
    cfg = ControllerConfig(throttle_max_pct=max_pct, throttle_step_pct=step)
    p = replace(p, memory_throttle_pct=min(p.memory_throttle_pct // 10 * step, max_pct))
    for action in of_type(decide(p, cfg, s).actions, SetMemoryThrottle):
        if p.phase in (Phase.DONE, Phase.FAILED):
            assert action.percent == 0
            continue
        assert p.phase is Phase.MEMORY
        assert p.round >= cfg.throttle_start_round
        assert p.memory_throttle_pct < action.percent <= max_pct
        assert action.percent == max_pct or action.percent % step == 0
        assert s.throttle_raised_round < p.round


@given(progresses(phases=(Phase.MEMORY,)), states())
def test_controller_raises_throttle_at_most_once_per_round(p: Progress, s: ControllerState) -> None:
    cfg = ControllerConfig()
    first = decide(p, cfg, s)
    raised = of_type(first.actions, SetMemoryThrottle)
    if raised and not of_type(first.actions, Abort):
        again = replace(p, memory_throttle_pct=raised[0].percent, elapsed_s=p.elapsed_s + 0.5)
        assert not of_type(decide(again, cfg, first.state).actions, SetMemoryThrottle)


@given(progresses(), states())
def test_controller_switches_over_only_when_remainder_fits_downtime_budget(
    p: Progress, s: ControllerState
) -> None:
    cfg = ControllerConfig()
    actions = decide(p, cfg, s).actions
    if Switchover() in actions:
        left = p.disk_remaining_bytes + p.memory_remaining_bytes
        assert p.phase in ACTIVE
        assert left == 0 or left <= p.transfer_rate_bps * cfg.max_downtime_ms / 1000 * cfg.switchover_safety
        assert not of_type(actions, Abort)


@given(sizes, sizes, st.integers(min_value=1, max_value=100 * GiB))
def test_controller_timeout_grows_with_droplet_size(disk: int, memory: int, more: int) -> None:
    cfg = ControllerConfig()
    t = completion_timeout_s(cfg, disk, memory)
    assert t >= cfg.timeout_floor_s
    assert completion_timeout_s(cfg, disk + more, memory) > t
    assert completion_timeout_s(cfg, disk, memory + more) > t


@given(progresses(phases=ACTIVE))
def test_controller_aborts_past_completion_timeout(p: Progress) -> None:
    cfg = ControllerConfig()
    late = replace(p, elapsed_s=completion_timeout_s(cfg, p.disk_total_bytes, p.memory_total_bytes) + 1)
    actions = decide(late, cfg, ControllerState()).actions
    assert actions == (Abort(AbortReason.TIMEOUT, actions[0].message),)  # type: ignore[union-attr]


@settings(max_examples=200)
@given(
    progresses(phases=ACTIVE),
    st.floats(min_value=0.2, max_value=0.9),
    st.floats(min_value=1, max_value=120, allow_nan=False),
)
def test_controller_detects_a_stall_only_without_a_remedy_left(
    p: Progress, shrink: float, tick_s: float
) -> None:
    """Feed a sequence: while the remainder keeps shrinking, never 'stalled'; when it stops, stalled
    once the window passes (after the last-resort disk limit, when that applies)."""
    cfg = ControllerConfig(stall_timeout_s=30, no_transfer_timeout_s=10**9, timeout_floor_s=10**9)
    p = replace(
        p,
        elapsed_s=0.0,
        disk_remaining_bytes=GiB,
        disk_total_bytes=2 * GiB,
        memory_remaining_bytes=0,
        memory_dirty_rate_bps=0.0,  # the stall rule alone decides (rates are cannot_converge's)
    )
    state = ControllerState()
    left = float(GiB)
    for i in range(10):
        p = replace(p, elapsed_s=i * tick_s, disk_remaining_bytes=int(left), bytes_transferred=i)
        d = decide(p, cfg, state)
        state = d.state
        assert not [a for a in of_type(d.actions, Abort) if a.reason is AbortReason.STALLED]
        left *= shrink
    frozen = replace(p, memory_throttle_pct=cfg.throttle_max_pct)
    stalled = False
    for j in range(1, 100):
        frozen = replace(frozen, elapsed_s=p.elapsed_s + j * tick_s, bytes_transferred=100 + j)
        last_new_low_s = state.best_remaining_at_s
        d = decide(frozen, cfg, state)
        state = d.state
        for limit in of_type(d.actions, SetDiskWriteLimit):  # the driver applies it (the last-resort limit)
            frozen = replace(frozen, disk_write_limit_bps=limit.bytes_per_s)
        if of_type(d.actions, Abort):
            assert of_type(d.actions, Abort)[0].reason is AbortReason.STALLED
            assert frozen.elapsed_s - last_new_low_s >= cfg.stall_timeout_s
            stalled = True
            break
    assert stalled


def test_controller_does_not_call_a_stall_while_the_throttle_can_still_rise() -> None:
    cfg = ControllerConfig()
    p = Progress(
        phase=Phase.MEMORY,
        elapsed_s=0.0,
        round=5,
        disk_total_bytes=0,
        disk_processed_bytes=0,
        disk_remaining_bytes=0,
        memory_total_bytes=4 * GiB,
        memory_processed_bytes=0,
        memory_remaining_bytes=2 * GiB,
        disk_dirty_rate_bps=0,
        memory_dirty_rate_bps=0,  # not triggering a raise: the stall rule alone decides
        transfer_rate_bps=GiB,
        memory_throttle_pct=40,
    )
    state = decide(p, cfg, ControllerState()).state
    later = replace(p, elapsed_s=100.0, bytes_transferred=10)
    assert not of_type(decide(later, cfg, state).actions, Abort)
    exhausted = replace(later, memory_throttle_pct=cfg.throttle_max_pct)
    assert of_type(decide(exhausted, cfg, state).actions, Abort)[0].reason is AbortReason.STALLED


def test_controller_aborts_when_no_data_moves_and_when_switchover_hangs() -> None:
    cfg = ControllerConfig()
    p = Progress(
        phase=Phase.DISK,
        elapsed_s=0.0,
        round=0,
        disk_total_bytes=10 * GiB,
        disk_processed_bytes=GiB,
        disk_remaining_bytes=9 * GiB,
        memory_total_bytes=GiB,
        memory_processed_bytes=0,
        memory_remaining_bytes=GiB,
        disk_dirty_rate_bps=0,
        memory_dirty_rate_bps=0,
        transfer_rate_bps=0,
        bytes_transferred=GiB,
    )
    state = decide(p, cfg, ControllerState()).state
    quiet = replace(p, elapsed_s=cfg.no_transfer_timeout_s)
    assert decide(quiet, cfg, state).actions[0] == Abort(AbortReason.NO_TRANSFER, "no data moved for 15 s")

    sw = replace(p, phase=Phase.SWITCHOVER)
    state = decide(sw, cfg, ControllerState()).state
    assert decide(replace(sw, elapsed_s=1.0), cfg, state).actions == ()
    hung = decide(replace(sw, elapsed_s=cfg.switchover_timeout_s), cfg, state).actions
    assert of_type(hung, Abort)[0].reason is AbortReason.SWITCHOVER_TIMEOUT


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_downtime_ms", 0),
        ("throttle_max_pct", 100),
        ("throttle_step_pct", 0),
        ("throttle_target_ratio", 0.9),
    ],
)
def test_controller_config_rejects_nonsense(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        ControllerConfig(**{field: value})  # type: ignore[arg-type]


def test_controller_a_long_first_pass_over_a_huge_disk_is_not_a_stall() -> None:
    """2 TiB at 1 GiB/s: each 30 s window moves 30 GiB, 1.5 % of the remainder, and that is progress."""
    cfg = ControllerConfig()
    state = ControllerState()
    total = 2048 * GiB
    for t in range(0, 600):
        left = total - t * GiB
        p = Progress(
            phase=Phase.DISK,
            elapsed_s=float(t),
            round=0,
            disk_total_bytes=total,
            disk_processed_bytes=total - left,
            disk_remaining_bytes=left,
            memory_total_bytes=64 * GiB,
            memory_processed_bytes=0,
            memory_remaining_bytes=64 * GiB,
            disk_dirty_rate_bps=10 * MiB,
            memory_dirty_rate_bps=0,
            transfer_rate_bps=GiB,
            bytes_transferred=t * GiB,
        )
        d = decide(p, cfg, state)
        state = d.state
        assert not of_type(d.actions, Abort), d.actions
