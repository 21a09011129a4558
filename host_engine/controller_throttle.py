"""The vCPU throttle for memory pre-copy, and the verdict that memory cannot converge even at its cap."""

from __future__ import annotations

import math
from dataclasses import replace  # noqa: F401 - the worked examples (doctests) use it

from host_engine.controller_config import (
    ControllerConfig,
    GiB,  # noqa: F401 - the worked examples use them
    MiB,
)
from host_engine.controller_config import example_progress as _example  # noqa: F401 - the worked examples use them
from host_engine.controller_downtime import fits_downtime, remaining_bytes
from host_engine.controller_state import ControllerState
from host_engine.drivers.base import Phase, Progress


def memory_throttle(
    progress: Progress, config: ControllerConfig, state: ControllerState, disk_limit_bps: int | None = None
) -> int:
    """The vCPU throttle (percent) this snapshot calls for: stepped, bounded, raised at most once a round.

    From round ``throttle_start_round`` on, if the guest dirties (memory + disk, the disk counted at its
    limit when one applies) at ≥ ``throttle_trigger_ratio`` of the transfer rate and the remainder does not
    yet fit the downtime budget, the throttle goes straight to the step that brings the guest's *unthrottled*
    rate down to ``throttle_target_ratio`` of the link, capped at ``throttle_max_pct``; a guest dirtying
    ≥ ``throttle_jump_ratio`` of the link (the remainder does not shrink at all) goes to the cap at once, so
    one round shows whether any throttle can help (``cannot_converge``). It never steps down before the end
    (that would undo the rounds it bought) and is 0 once the migration is done or failed.

    Worked examples (link 1 GiB/s, 2 GiB left, round 3):

    A database dirtying 300 MiB/s converges by itself: no throttle.

    >>> cfg, st = ControllerConfig(), ControllerState()
    >>> p = _example(phase=Phase.MEMORY, round=3, transfer_rate_bps=GiB, memory_remaining_bytes=2 * GiB,
    ...              memory_dirty_rate_bps=300 * MiB)
    >>> memory_throttle(p, cfg, st)
    0

    A guest dirtying 900 MiB/s: needs 1 - 0.5 x 1024/900 = 43 %, stepped to 50 %; QEMU would start at 20 %
    and creep up.

    >>> memory_throttle(replace(p, memory_dirty_rate_bps=900 * MiB), cfg, st)
    50

    A guest dirtying as fast as the link (the remainder does not shrink): straight to the cap.

    >>> memory_throttle(replace(p, memory_dirty_rate_bps=GiB), cfg, st)
    80

    At 50 % already and measured 850 MiB/s (1700 MiB/s unthrottled): needs 69.9 %, stepped up to 70 %.

    >>> memory_throttle(replace(p, memory_throttle_pct=50, memory_dirty_rate_bps=850 * MiB), cfg, st)
    70

    Dirtying 4 GiB/s (diabolical): bounded at 80 %.

    >>> memory_throttle(replace(p, memory_dirty_rate_bps=4 * GiB), cfg, st)
    80

    Already raised in this round: hold until the next round shows the effect.

    >>> memory_throttle(replace(p, memory_dirty_rate_bps=900 * MiB), cfg,
    ...                 replace(st, throttle_raised_round=3))
    0
    """
    current = progress.memory_throttle_pct
    if progress.phase in (Phase.DONE, Phase.FAILED):
        return 0
    if progress.phase is not Phase.MEMORY or progress.round < config.throttle_start_round:
        return current
    if state.throttle_raised_round >= progress.round or current >= config.throttle_max_pct:
        return current
    rate = progress.transfer_rate_bps
    if rate <= 0 or fits_downtime(progress, config) or rounds_still_shrink(progress, config, state):
        return current
    disk_rate = progress.disk_dirty_rate_bps
    if disk_limit_bps is not None:
        disk_rate = min(disk_rate, float(disk_limit_bps))
    dirty = progress.memory_dirty_rate_bps + disk_rate
    if dirty < rate * config.throttle_trigger_ratio:
        return current
    return _throttle_step(dirty, rate, current, config)


def rounds_still_shrink(progress: Progress, config: ControllerConfig, state: ControllerState) -> bool:
    """Whether this memory round started with less than ``1 - switchover_min_shrink`` of the dirty set the
    round before started with (both after the first pass): the guest converges without a throttle, whatever
    the rates predict. The rates can say otherwise when the transfer rate, averaged over a window that
    began before the memory phase, reads low: a guest streaming 32 MiB/s at a 48 MiB/s cap was throttled to
    40 % while its rounds shrank by a third each (measured).

    >>> cfg = ControllerConfig()
    >>> p = _example(phase=Phase.MEMORY, round=4)
    >>> st = ControllerState(throttle_round=4, round_start_bytes=60 * MiB)
    >>> st = replace(st, previous_round_start_bytes=90 * MiB)
    >>> rounds_still_shrink(p, cfg, st)
    True
    >>> rounds_still_shrink(p, cfg, replace(st, round_start_bytes=80 * MiB))   # shrank by 11 %: no
    False
    """
    start, before = state.round_start_bytes, state.previous_round_start_bytes
    if state.throttle_round != progress.round or start is None or before is None:
        return False
    return start <= before * (1.0 - config.switchover_min_shrink)


def _throttle_step(dirty: float, rate: float, current: int, config: ControllerConfig) -> int:
    if dirty >= rate * config.throttle_jump_ratio:
        return config.throttle_max_pct
    unthrottled = dirty / max(0.01, 1.0 - current / 100.0)
    needed_pct = 100.0 * (1.0 - config.throttle_target_ratio * rate / unthrottled)
    step = config.throttle_step_pct
    stepped = math.ceil(needed_pct / step - 1e-9) * step
    # Always at least one step up when triggered: the measured rate says the current level is not enough.
    return min(config.throttle_max_pct, max(stepped, current + step))


def rounds_to_fit(left_bytes: float, dirty_bps: float, rate_bps: float, budget_bytes: float) -> float:
    """Pre-copy rounds until the remainder fits ``budget_bytes``: each round re-dirties ``dirty/rate`` of
    what it sent, so the remainder shrinks geometrically by that ratio (``inf`` when it does not shrink).

    >>> rounds_to_fit(64 * MiB, 16 * MiB, 32 * MiB, 8 * MiB)   # halves each round: 64 -> 32 -> 16 -> 8
    3.0
    >>> rounds_to_fit(48 * MiB, 32 * MiB, 32 * MiB, 8 * MiB)   # dirtied as fast as sent: never
    inf
    >>> rounds_to_fit(4 * MiB, 32 * MiB, 32 * MiB, 8 * MiB)    # fits already
    0.0
    """
    if left_bytes <= budget_bytes:
        return 0.0
    if rate_bps <= 0 or dirty_bps >= rate_bps:
        return math.inf
    if dirty_bps <= 0 or budget_bytes <= 0:
        return 1.0 if budget_bytes > 0 else math.inf
    return math.log(budget_bytes / left_bytes) / math.log(dirty_bps / rate_bps)


def cannot_converge(progress: Progress, config: ControllerConfig, state: ControllerState) -> str | None:
    """Why memory cannot converge even at the highest throttle allowed, or None while it may.

    From round ``throttle_start_round`` on (QEMU's first dirty-rate sample), in the memory phase, with the
    remainder not yet within the downtime budget: the dirty rate *under the throttle cap* is projected (before
    the cap is in force: the measured rate scaled down in proportion to the vCPU time taken away, the best a
    throttle can do) or measured (once a whole round ran under the cap). If the remainder would then need
    more than ``converge_max_rounds`` rounds to fit the budget, the attempt is hopeless.

    Worked examples (link 32 MiB/s, 300 ms budget: plans for 7.7 MiB; 47 MiB left, round 3):

    A 48 MiB working set rewritten faster than a round reads as ~32 MiB/s. Before the cap is in force, the
    best case (80 % throttle: 6.4 MiB/s) would converge in about one round: not yet hopeless.

    >>> cfg, st = ControllerConfig(), ControllerState()
    >>> p = _example(phase=Phase.MEMORY, round=3, transfer_rate_bps=32 * MiB, memory_remaining_bytes=47 * MiB,
    ...              memory_dirty_rate_bps=31.9 * MiB)
    >>> cannot_converge(p, cfg, st) is None
    True

    After a whole round under the cap, QEMU still measures 31.9 MiB/s: hopeless.

    >>> capped = replace(p, round=5, memory_throttle_pct=80, memory_throttle_in_force_pct=80)
    >>> capped_st = replace(st, throttle_round=5, throttle_this_round_pct=80, throttle_last_round_pct=80)
    >>> print(cannot_converge(capped, cfg, capped_st))  # doctest: +NORMALIZE_WHITESPACE
    memory cannot converge: 31.9 MiB/s dirtied under the 80 % throttle (measured) against 32.0 MiB/s sent;
    47 MiB left, 7.7 MiB fit the downtime budget

    A guest dirtying 10x the link cannot be saved even at best: said at once, with no throttle tried.

    >>> cannot_converge(replace(p, memory_dirty_rate_bps=320 * MiB), cfg, st)[:60]
    'memory cannot converge: 64.0 MiB/s dirtied under the 80 % th'
    """
    if progress.phase is not Phase.MEMORY or progress.round < config.throttle_start_round:
        return None
    rate = progress.transfer_rate_bps
    if rate <= 0 or progress.memory_dirty_rate_bps <= 0 or fits_downtime(progress, config):
        return None
    disk_rate = progress.disk_dirty_rate_bps
    limit = progress.disk_write_limit_bps
    if limit is None and config.disk_limit_enabled:
        limit = max(config.disk_limit_floor_bps, int(rate * config.disk_limit_ratio))  # a remedy left
    if limit is not None:
        disk_rate = min(disk_rate, float(limit))
    cap = config.throttle_max_pct
    # The rate sampled this round was measured over the last one, under the throttle in force then.
    measured_at = state.throttle_last_round_pct if state.throttle_round == progress.round else 0
    measured = measured_at >= cap
    memory_rate = progress.memory_dirty_rate_bps
    if not measured:
        memory_rate *= (1.0 - cap / 100.0) / max(0.01, 1.0 - measured_at / 100.0)
    dirty = memory_rate + disk_rate
    left = remaining_bytes(progress)
    budget = rate * config.max_downtime_ms / 1000.0 * config.switchover_safety
    if rounds_to_fit(left, dirty, rate, budget) <= config.converge_max_rounds:
        return None
    return (
        f"memory cannot converge: {dirty / MiB:.1f} MiB/s dirtied under the {cap} % throttle "
        f"({'measured' if measured else 'at best'}) against {rate / MiB:.1f} MiB/s sent; "
        f"{left / MiB:.0f} MiB left, {budget / MiB:.1f} MiB fit the downtime budget"
    )
