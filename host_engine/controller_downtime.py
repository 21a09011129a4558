"""When to switch over, and the downtime limit handed to the hypervisor (the ramp), as pure functions.

QEMU switches over by itself once the RAM left fits its downtime limit at the bandwidth it measures, so the
limit it holds decides how large a remainder a pause may carry: ``next_downtime`` hands it a small limit first
and raises it only when rounds stop shrinking the remainder; ``should_switchover`` (the controller's own
pause)
never goes beyond that limit.
"""

from __future__ import annotations

import math
from dataclasses import replace

from host_engine.controller_config import ControllerConfig, GiB, MiB, downtime_steps  # noqa: F401 - the worked examples use them
from host_engine.controller_config import example_progress as _example  # noqa: F401 - the worked examples use them
from host_engine.controller_state import DowntimeRamp, DowntimeStage
from host_engine.drivers.base import Phase, Progress


def remaining_bytes(progress: Progress) -> int:
    """Disk and memory still to copy."""
    return progress.disk_remaining_bytes + progress.memory_remaining_bytes


def fits_downtime(progress: Progress, config: ControllerConfig, budget_ms: float | None = None) -> bool:
    """Whether the remainder can be moved within the downtime budget at the measured transfer rate.

    Worked examples (300 ms budget, 80 % safety → plan for 240 ms):

    At 1 GiB/s a 200 MiB remainder takes ~195 ms: fits.

    >>> cfg = ControllerConfig()
    >>> p = _example(transfer_rate_bps=GiB, memory_remaining_bytes=200 * MiB)
    >>> fits_downtime(p, cfg)
    True

    300 MiB would take ~293 ms, beyond the 240 ms planned: keep copying.

    >>> fits_downtime(replace(p, memory_remaining_bytes=300 * MiB), cfg)
    False

    Nothing measured yet (rate 0): never switch over blind, unless nothing is left at all.

    >>> fits_downtime(replace(p, transfer_rate_bps=0.0), cfg)
    False
    >>> fits_downtime(replace(p, transfer_rate_bps=0.0, memory_remaining_bytes=0), cfg)
    True
    """
    left = remaining_bytes(progress)
    if left == 0:
        return True
    budget = config.max_downtime_ms if budget_ms is None else budget_ms
    return left <= progress.transfer_rate_bps * budget / 1000.0 * config.switchover_safety


def should_switchover(
    progress: Progress, config: ControllerConfig, previous_remaining: int | None, limit_ms: int | None = None
) -> bool:
    """Switch over now? Only while copying, and only when the remainder fits the downtime limit QEMU has
    (``limit_ms``, default the whole budget): a pause never moves a remainder QEMU would not have taken by
    itself at its next dirty sync. The pause is the fallback, not the rule: QEMU checks its remainder every
    ~50 ms against ``bandwidth x limit``, a looser test than this one (``switchover_safety``), so it
    normally switches first, and its own final pass goes at line rate, whereas a source paused by the
    controller goes on sending at the bandwidth cap until QEMU's next check (under a cap a pause can cost up
    to the limit where QEMU's own switchover costs the remainder at line rate; hence none in the tick that
    raises the limit, see ``controller.decide``). It matters where QEMU measures the link slower than the
    engine does and leaves a fitting remainder untaken.

    Within the budget: go when nothing is left, or when the last tick shrank the remainder by less than
    ``switchover_min_shrink`` (more rounds would not shorten the pause), or, for a throttled or disk-limited
    guest (it pays for every tick), once the remainder fits ``switchover_target_ms``; else copy one more tick.

    Worked examples (1 GiB/s; budget 300 ms x 0.8 = 240 ms, about 245 MiB; target 50 ms, about 41 MiB):

    >>> cfg = ControllerConfig()
    >>> p = _example(transfer_rate_bps=GiB, memory_remaining_bytes=100 * MiB)
    >>> should_switchover(p, cfg, previous_remaining=400 * MiB)   # shrinking fast: one more round
    False
    >>> should_switchover(p, cfg, previous_remaining=110 * MiB)   # stuck around 100 MiB: go (~98 ms)
    True
    >>> throttled = replace(p, memory_throttle_pct=30)
    >>> should_switchover(throttled, cfg, previous_remaining=400 * MiB)  # shrinking: still worth a tick
    False
    >>> small = replace(throttled, memory_remaining_bytes=30 * MiB)
    >>> should_switchover(small, cfg, previous_remaining=400 * MiB)
    True
    >>> should_switchover(replace(p, memory_remaining_bytes=300 * MiB), cfg, previous_remaining=300 * MiB)
    False

    Stuck around 100 MiB while QEMU's limit is still 50 ms (about 41 MiB planned): not yet; the limit is
    raised first (``next_downtime``) and QEMU takes it.

    >>> should_switchover(p, cfg, previous_remaining=110 * MiB, limit_ms=50)
    False
    """
    limit = config.max_downtime_ms if limit_ms is None else min(limit_ms, config.max_downtime_ms)
    if progress.phase not in (Phase.DISK, Phase.MEMORY) or not fits_downtime(progress, config, limit):
        return False
    left = remaining_bytes(progress)
    if left == 0:
        return True
    slowed = progress.memory_throttle_pct > 0 or progress.disk_write_limit_bps is not None
    if slowed and fits_downtime(progress, config, min(limit, config.switchover_target_ms)):
        return True
    if previous_remaining is None:
        return False
    return left > previous_remaining * (1.0 - config.switchover_min_shrink)


def next_downtime(progress: Progress, config: ControllerConfig, ramp: DowntimeRamp) -> DowntimeRamp:
    """The downtime limit this snapshot calls for: held while the rounds still shrink, raised when not.

    Judged once per memory round, on the remainder its first snapshot shows (the dirty set the round
    started with). Round 1 is the first pass over all memory. From round 2 on, while the remainder does not
    fit the limit in force, more rounds still pay when they shrink it: when this round started with less
    than ``1 - switchover_min_shrink`` of what the one before started with, the limit holds. Against the
    first pass (round 2) that shrink says nothing, so there the guest must instead dirty less than
    ``1 - switchover_min_shrink`` of what the link moves (so the next round will shrink it again; a guest
    rewriting a hot set each round dirties about as fast as the link moves, and waiting a round to see it
    would cost a round of bytes); from round 3 on the observed shrink is trusted over the rates. Otherwise
    more rounds will not shorten the pause: the limit goes to the smallest step that fits the remainder at
    the measured rate (with ``switchover_safety``), and at least one step up, since the hypervisor did not
    take the remainder at the limit it had. A throttled guest pays for every round in vCPU time: from round
    2 on, at every tick, the limit goes to the smallest step that fits the remainder, if that is above the
    one in force. (A disk write limit costs less: it slows writes only, and ends with the mirror's tail; the
    rounds decide.)
    Only ever raised.

    Worked examples (link 1 GiB/s; steps 50, 100, 200, 300 ms):

    A round that started with 64 MiB after one that started with 256 MiB: still shrinking, hold 50 ms.

    >>> cfg = ControllerConfig()
    >>> p = _example(phase=Phase.MEMORY, round=3, transfer_rate_bps=GiB, memory_remaining_bytes=64 * MiB)
    >>> shrinking = DowntimeRamp(round=2, round_start_bytes=256 * MiB)
    >>> next_downtime(p, cfg, shrinking).limit(cfg)
    50

    Stuck at 64 MiB (a hot set rewritten every round): 64 MiB takes 62.5 ms, 78 ms with the safety
    margin: the 100 ms step.

    >>> stuck = DowntimeRamp(round=2, round_start_bytes=70 * MiB)
    >>> next_downtime(p, cfg, stuck).limit(cfg)
    100

    Round 2 against the first pass (which carried all memory), and QEMU measures the guest dirtying
    900 MiB/s: the next round will not shrink it by a fifth, so the limit goes up now rather than a round
    later.

    >>> second = replace(p, round=2, memory_dirty_rate_bps=900 * MiB)
    >>> next_downtime(second, cfg, DowntimeRamp(round=1, round_start_bytes=4 * GiB)).limit(cfg)
    100

    Rounds after the first pass that shrink by a fifth or more are trusted over the rates: hold.

    >>> next_downtime(replace(p, memory_dirty_rate_bps=900 * MiB), cfg, shrinking).limit(cfg)
    50

    Already fits the 50 ms in force (10 MiB, about 12 ms): QEMU takes it by itself; hold. Unless the round
    before fitted too and QEMU did not take it (it measures the link slower): one step up.

    >>> small = replace(p, memory_remaining_bytes=10 * MiB)
    >>> next_downtime(small, cfg, stuck).limit(cfg)
    50
    >>> next_downtime(small, cfg, replace(stuck, round_start_bytes=10 * MiB)).limit(cfg)
    100

    Stuck at 200 MiB (244 ms planned): the budget; the throttle rules take over if even that is short.

    >>> big = replace(p, memory_remaining_bytes=200 * MiB)
    >>> r = next_downtime(big, cfg, replace(stuck, round_start_bytes=200 * MiB))
    >>> r.limit(cfg), r.stage.value
    (300, 'budget')

    Throttled: no round more than needed; 64 MiB needs the 100 ms step now.

    >>> next_downtime(replace(p, memory_throttle_pct=30), cfg, shrinking).limit(cfg)
    100
    """
    if progress.phase is not Phase.MEMORY or ramp.stage is DowntimeStage.BUDGET:
        return ramp
    current = ramp.limit(config)
    if progress.memory_throttle_pct > 0 and progress.round >= 2:  # round 1's remainder: the first pass
        fitting = _fitting_step(progress, config)
        return ramp.raised_to(fitting, config) if fitting > current else ramp
    if progress.round == ramp.round:
        return ramp
    before, before_round = ramp.round_start_bytes, ramp.round
    ramp = replace(ramp, round=progress.round, round_start_bytes=remaining_bytes(progress))
    if progress.round < 2 or before is None:
        return ramp
    if _ramp_holds(progress, config, before, current, trust_shrink=before_round >= 2):
        return ramp
    higher = [s for s in downtime_steps(config) if s > current] or [config.max_downtime_ms]
    return ramp.raised_to(max(higher[0], _fitting_step(progress, config)), config)


def _fitting_step(progress: Progress, config: ControllerConfig) -> int:
    """The smallest downtime step the remainder fits at the measured rate (the budget if none does)."""
    rate = progress.transfer_rate_bps
    left = remaining_bytes(progress)
    needed_ms = left / rate * 1000.0 / config.switchover_safety if rate > 0 else math.inf
    return next((s for s in downtime_steps(config) if s >= needed_ms), config.max_downtime_ms)


def _ramp_holds(
    progress: Progress, config: ControllerConfig, before: int, current_ms: int, *, trust_shrink: bool
) -> bool:
    """Whether the limit in force still serves (see ``next_downtime``): the remainder fits it (and did not
    fit it when the round before started: a remainder that fitted then and was not taken means the
    hypervisor measures the link slower than we do), or the rounds still shrink it by enough.

    ``trust_shrink``: the round before was itself after the first pass, so the shrink between the two is
    observed convergence and holds the limit whatever the rates predict (as the throttle does,
    ``rounds_still_shrink``). The rates can read otherwise when the transfer rate reads low: a guest
    streaming 32 MiB/s at a 48 MiB/s cap, its rounds shrinking by a third each, got the whole budget
    (measured). Against the first pass (all memory) the remainder says nothing, so in round 2 the dirty
    rate alone decides whether the next round will shrink it."""
    rate = progress.transfer_rate_bps
    if fits_downtime(progress, config, current_ms):
        return before > rate * current_ms / 1000.0 * config.switchover_safety
    keep = 1.0 - config.switchover_min_shrink
    dirty = progress.memory_dirty_rate_bps + progress.disk_dirty_rate_bps
    if not trust_shrink:
        # Against the first pass the remainder says nothing: a driver's bound on it (libvirt's takes the
        # larger of this round's and the last round's first samples) reads round 2 as the first pass.
        return dirty < rate * keep
    return remaining_bytes(progress) <= before * keep
