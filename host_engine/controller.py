"""The convergence controller: the policy of a live migration, as small pure functions (DESIGN.md §7).

The driver is the mechanism (copy disk, pre-copy memory, switch over); this module decides, from one
``Progress`` snapshot plus a little remembered state, what to do next:

- keep copying (no action);
- when few modified disk blocks remain but the droplet keeps writing fast, apply a *temporary* disk write
  limit, and lift it the moment switchover is done (or the migration ends any other way); the same limit
  is the last resort before calling a stall, for a guest that writes faster than its share of the link;
- when memory pre-copy is not converging, a short, stepped vCPU throttle, bounded, never stepped down
  mid-migration and lifted at the end;
- hand QEMU a *small* downtime limit first and raise it in steps toward the budget only when the rounds
  stop shrinking the remainder (``next_downtime``, a state machine per attempt): QEMU switches over by
  itself once the remainder fits its limit, so an easy guest switches with a small remainder, and a guest
  whose remainder no longer shrinks gets the limit it needs at once instead of round after round;
- switch over when the remaining data fits the limit QEMU has at the measured bandwidth (copying on while
  another tick still shrinks it, unless the guest is being slowed), never at a remainder QEMU would not
  have taken by itself;
- give up as soon as the measured rates say memory cannot converge even at the highest throttle allowed
  (within two memory rounds of the first dirty-rate sample), rather than burn bytes and guest CPU until a
  stall timer fires;
- abort when the completion timeout for the droplet's size passes, when progress stalls with no remedy
  left, or when a switchover does not finish (the guest is paused: resuming the source beats a frozen guest;
  the attempt then asks the hypervisor, and a migration that completed meanwhile is recorded completed).

Everything here is pure: ``decide(progress, config, state) -> Decision``. The loop that calls it, applies
the actions and sleeps is ``host_engine.attempt.run_migration``.

Defaults come from real live migrations between two libvirt hosts on one machine (libvirt 9.0, QEMU 7.2,
TCG guests); the comment on each says what it rests on.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, replace

from host_engine.drivers.base import Phase, Progress

MiB = 1024 * 1024
GiB = 1024 * MiB

# --- Defaults, each from a measurement --------------------------------------------------------------
# QEMU's own default downtime limit. Measured real switchovers: 42 ms (200 MiB/s, 300 ms limit),
# 219 ms (TCG guest, default settings), 255 ms (48 MiB rewritten continuously + auto-converge); all fit.
DEFAULT_MAX_DOWNTIME_MS = 300
# The downtime limit QEMU gets first; each raise doubles it, up to the budget (50, 100, 200, 300 ms). QEMU
# switches over by itself once the RAM left fits limit x its measured bandwidth, so with the budget as the
# first limit it takes whatever the first pass left (measured on a guest streaming 64 MiB/s over 96 MiB,
# unlimited bandwidth: 131-647 ms downtime at QEMU's 300 ms, 52-105 ms at 50 ms, a few rounds more). Not
# lower: a switchover's fixed part (device state, resuming on the target) was 17-60 ms measured, so a
# smaller limit buys rounds, not a shorter pause.
DEFAULT_INITIAL_DOWNTIME_MS = 50
# Within the budget, keep copying while each tick still shrinks the remainder by >= 20 %: an unthrottled
# guest pays nothing for another round and the pause gets shorter; once the remainder stops shrinking (or is
# gone), switch over. A throttled or disk-limited guest pays for every tick, so it goes as soon as the
# remainder moves in 50 ms: the notes' real switchovers took 30-60 ms in all at unlimited bandwidth, so below
# that the copy is no longer what the guest waits for.
DEFAULT_SWITCHOVER_MIN_SHRINK = 0.2
DEFAULT_SWITCHOVER_TARGET_MS = 50
# Plan the switchover against 80 % of the budget: the transfer rate is a one-tick estimate, and the
# switchover itself has a fixed cost (device state, resume on the target: the 30-60 ms seen at unlimited
# bandwidth) that is not in "remaining bytes".
DEFAULT_SWITCHOVER_SAFETY = 0.8
# "Few disk blocks remain" = what the link moves in 5 s. Below that, a short write limit ends the mirror
# within a few seconds; above it, a limit would slow the guest for longer than the copy it saves.
DEFAULT_DISK_LIMIT_WINDOW_S = 5.0
# "Writes fast" = dirtying at ≥ 50 % of the transfer rate: each mirror pass then shrinks by less than half,
# so the tail drags on (notes: a guest writing faster than the link never converges at all).
DEFAULT_DISK_FAST_WRITE_RATIO = 0.5
# The limit: 10 % of the measured transfer rate, so each pass shrinks ≥ 10x; floored at 1 MiB/s so the
# guest's journal / log writes still make progress (the TCG guest wrote 4-8 MiB/s flat out).
DEFAULT_DISK_LIMIT_RATIO = 0.1
DEFAULT_DISK_LIMIT_FLOOR_BPS = 1 * MiB
# Memory throttle: not before the second round (the first pass always leaves the pages dirtied behind it),
# and only when the guest dirties ≥ 80 % of what the link carries (rounds shrink by < 20 %: too slow).
DEFAULT_THROTTLE_START_ROUND = 2
DEFAULT_THROTTLE_TRIGGER_RATIO = 0.8
# Aim the throttle at a dirty rate of 50 % of the link, so every further round at least halves the remainder.
# QEMU's auto-converge instead starts at 20 % and adds 10 % per round whatever the need; stepping straight to
# the level the measured rates call for throttles fewer seconds for the same convergence.
DEFAULT_THROTTLE_TARGET_RATIO = 0.5
DEFAULT_THROTTLE_STEP_PCT = 10
# Capped at 80 %: the notes show a guest that re-dirties its whole working set each round does not converge
# even at QEMU's 99 %, so steps past 80 % buy nothing for those guests and only hurt the others.
DEFAULT_THROTTLE_MAX_PCT = 80
# A guest dirtying >= 95 % of what the link carries leaves the remainder where it was, and its real rate may
# be far higher: QEMU counts a page once per round however often it is rewritten, so a working set rewritten
# many times a round reads as "set size / round time" (measured: a 48 MiB set rewritten 18 times a second
# read as 31.9 MiB/s at a 32 MiB/s cap, at 0 % and at 80 % throttle alike). Stepping up from 50 % would
# spend rounds learning that; the throttle goes to its cap at once, and one round under it tells.
DEFAULT_THROTTLE_JUMP_RATIO = 0.95
# "Cannot converge": at the dirty rate measured (or, before the cap is in force, projected) under the highest
# throttle, the remainder would need more than this many rounds to fit the downtime budget (each round leaves
# dirty/transfer of the one before). QEMU's non-converging run spent 36 rounds; a converging guest needs 2-6.
DEFAULT_CONVERGE_MAX_ROUNDS = 10
# Completion timeout = 120 s + 64 s per GiB of disk + memory, i.e. "slower than 16 MiB/s on average": half the
# 32 MiB/s cap at which the notes' dirtying guest already failed to converge. 120 s covers the fixed costs
# (target QEMU start, first probe: a few s; ~1.2 s handover) with room. Nova uses 800 s/GiB: far too patient.
DEFAULT_TIMEOUT_FLOOR_S = 120.0
DEFAULT_TIMEOUT_S_PER_GIB = 64.0
# Stalled = the remainder has not reached a new low (by ≥ 5 % of itself, or of what the link moves in the
# window if that is less) for 30 s and no remedy is left. QEMU's non-converging run above spent 60 s / 36
# rounds at a constant remainder; 30 s is ~18 such rounds.
DEFAULT_STALL_TIMEOUT_S = 30.0
DEFAULT_STALL_MIN_IMPROVEMENT = 0.05
# No byte moved for 15 s: the link or a peer is gone (TCP keepalive-scale), whatever the remainder says.
DEFAULT_NO_TRANSFER_TIMEOUT_S = 15.0
# A switchover pauses the guest; one planned at ≤ 300 ms that has not finished after 5 s never will.
DEFAULT_SWITCHOVER_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class ControllerConfig:
    """The controller's tunables. Built once at the entry point and passed down."""

    max_downtime_ms: int = DEFAULT_MAX_DOWNTIME_MS
    # The first downtime limit handed to QEMU (``next_downtime`` raises it); = max_downtime_ms: no ramp.
    initial_downtime_ms: int = DEFAULT_INITIAL_DOWNTIME_MS
    switchover_safety: float = DEFAULT_SWITCHOVER_SAFETY
    switchover_min_shrink: float = DEFAULT_SWITCHOVER_MIN_SHRINK
    switchover_target_ms: int = DEFAULT_SWITCHOVER_TARGET_MS
    disk_limit_window_s: float = DEFAULT_DISK_LIMIT_WINDOW_S
    disk_fast_write_ratio: float = DEFAULT_DISK_FAST_WRITE_RATIO
    disk_limit_ratio: float = DEFAULT_DISK_LIMIT_RATIO
    disk_limit_floor_bps: int = DEFAULT_DISK_LIMIT_FLOOR_BPS
    disk_limit_enabled: bool = True
    throttle_start_round: int = DEFAULT_THROTTLE_START_ROUND
    throttle_trigger_ratio: float = DEFAULT_THROTTLE_TRIGGER_RATIO
    throttle_target_ratio: float = DEFAULT_THROTTLE_TARGET_RATIO
    throttle_step_pct: int = DEFAULT_THROTTLE_STEP_PCT
    throttle_max_pct: int = DEFAULT_THROTTLE_MAX_PCT
    throttle_jump_ratio: float = DEFAULT_THROTTLE_JUMP_RATIO
    converge_max_rounds: int = DEFAULT_CONVERGE_MAX_ROUNDS
    timeout_floor_s: float = DEFAULT_TIMEOUT_FLOOR_S
    timeout_s_per_gib: float = DEFAULT_TIMEOUT_S_PER_GIB
    stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S
    stall_min_improvement: float = DEFAULT_STALL_MIN_IMPROVEMENT
    no_transfer_timeout_s: float = DEFAULT_NO_TRANSFER_TIMEOUT_S
    switchover_timeout_s: float = DEFAULT_SWITCHOVER_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.max_downtime_ms <= 0:
            raise ValueError("max_downtime_ms must be positive")
        if self.initial_downtime_ms <= 0:
            raise ValueError("initial_downtime_ms must be positive")
        if not 0 <= self.throttle_max_pct <= 99:
            raise ValueError("throttle_max_pct must be within 0..99")
        if self.throttle_step_pct <= 0:
            raise ValueError("throttle_step_pct must be positive")
        if not 0 < self.throttle_target_ratio <= self.throttle_trigger_ratio:
            raise ValueError("need 0 < throttle_target_ratio <= throttle_trigger_ratio")


# --- Actions ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SetDiskWriteLimit:
    """Limit the source droplet's disk writes; ``None`` lifts the limit."""

    bytes_per_s: int | None


@dataclass(frozen=True)
class SetMemoryThrottle:
    """Slow the source droplet's vCPUs by ``percent`` (0 lifts it)."""

    percent: int


@dataclass(frozen=True)
class Switchover:
    """Pause the source and move the remainder: it now fits the downtime limit QEMU has."""


@dataclass(frozen=True)
class SetMaxDowntime:
    """Hand the hypervisor a new downtime limit: it switches over by itself once the remainder fits."""

    ms: int


class AbortReason(enum.Enum):
    TIMEOUT = "timeout"
    STALLED = "stalled"
    NO_TRANSFER = "no_transfer"
    SWITCHOVER_TIMEOUT = "switchover_timeout"
    # The measured rates say memory cannot converge even at the highest throttle allowed.
    NOT_CONVERGING = "not_converging"


#: Reasons that say the guest did not converge (the retry path counts them towards going offline).
NONCONVERGING = frozenset({AbortReason.TIMEOUT, AbortReason.STALLED, AbortReason.NOT_CONVERGING})


@dataclass(frozen=True)
class Abort:
    """Give up on this attempt: the caller aborts, cleans the target and hands over to the retry path."""

    reason: AbortReason
    message: str


Action = SetDiskWriteLimit | SetMemoryThrottle | SetMaxDowntime | Switchover | Abort


class DowntimeStage(enum.Enum):
    """Where an attempt's downtime limit stands (``next_downtime`` moves it, forward only)."""

    INITIAL = "initial"  # the small first limit: QEMU switches by itself only on a small remainder
    RAISED = "raised"  # a step between: the remainder stopped shrinking at a smaller limit
    BUDGET = "budget"  # the whole budget: QEMU takes any remainder that fits it


_DOWNTIME_TRANSITIONS: dict[DowntimeStage, frozenset[DowntimeStage]] = {
    DowntimeStage.INITIAL: frozenset({DowntimeStage.RAISED, DowntimeStage.BUDGET}),
    DowntimeStage.RAISED: frozenset({DowntimeStage.RAISED, DowntimeStage.BUDGET}),
    DowntimeStage.BUDGET: frozenset(),
}


@dataclass(frozen=True)
class DowntimeRamp:
    """The downtime limit the hypervisor has, and the memory rounds it was judged on.

    ``limit_ms`` None: the initial limit (``initial_downtime_ms``), set before the copy starts.
    """

    stage: DowntimeStage = DowntimeStage.INITIAL
    limit_ms: int | None = None
    round: int = -1
    round_start_bytes: int | None = None

    def limit(self, config: ControllerConfig) -> int:
        return self.limit_ms if self.limit_ms is not None else initial_downtime_ms(config)

    def raised_to(self, limit_ms: int, config: ControllerConfig) -> DowntimeRamp:
        stage = DowntimeStage.BUDGET if limit_ms >= config.max_downtime_ms else DowntimeStage.RAISED
        if stage not in _DOWNTIME_TRANSITIONS[self.stage]:
            raise ValueError(f"illegal downtime transition {self.stage.value} -> {stage.value}")
        return replace(self, stage=stage, limit_ms=min(limit_ms, config.max_downtime_ms))


@dataclass(frozen=True)
class ControllerState:
    """What the controller remembers between ticks. Start with ``ControllerState()``."""

    best_remaining_bytes: int | None = None
    best_remaining_at_s: float = 0.0
    last_bytes_transferred: int = 0
    last_transfer_at_s: float = 0.0
    throttle_raised_round: int = -1
    # The throttle in force during the current memory round and during the one before: QEMU measures the
    # dirty rate at the dirty sync that ends a round, so a round's rate sample tells of the previous round.
    throttle_round: int = -1
    throttle_this_round_pct: int = 0
    throttle_last_round_pct: int = 0
    switchover_requested_at_s: float | None = None
    previous_remaining_bytes: int | None = None
    downtime: DowntimeRamp = DowntimeRamp()


@dataclass(frozen=True)
class Decision:
    actions: tuple[Action, ...]
    state: ControllerState


# --- The policy as small pure functions -------------------------------------------------------------------


def remaining_bytes(progress: Progress) -> int:
    """Disk and memory still to copy."""
    return progress.disk_remaining_bytes + progress.memory_remaining_bytes


def completion_timeout_s(config: ControllerConfig, disk_bytes: int, memory_bytes: int) -> float:
    """How long one attempt may take before it is aborted: a floor plus a time per GiB of data.

    Worked examples with the defaults (120 s + 64 s/GiB):

    >>> cfg = ControllerConfig()
    >>> completion_timeout_s(cfg, 0, 512 * MiB)          # a tiny droplet: the floor dominates
    152.0
    >>> completion_timeout_s(cfg, 80 * GiB, 4 * GiB)     # 84 GiB: 120 + 84 x 64 s, about 1.5 h
    5496.0
    """
    total_gib = (disk_bytes + memory_bytes) / GiB
    return config.timeout_floor_s + config.timeout_s_per_gib * total_gib


def eta_s(progress: Progress) -> float | None:
    """Seconds until the remainder is gone at the current rates, or None while it is not shrinking.

    The guest re-dirties while the copy runs, so the remainder shrinks at transfer minus dirty rate; before
    the memory phase the memory still to copy is in the remainder too. A rough figure for people, not policy.

    >>> p = _example(transfer_rate_bps=GiB, memory_remaining_bytes=2 * GiB, memory_dirty_rate_bps=512 * MiB)
    >>> eta_s(p)
    4.0
    >>> eta_s(replace(p, memory_dirty_rate_bps=GiB)) is None
    True
    """
    if progress.phase in (Phase.DONE, Phase.FAILED):
        return 0.0 if progress.phase is Phase.DONE else None
    net = progress.transfer_rate_bps - progress.disk_dirty_rate_bps - progress.memory_dirty_rate_bps
    if net <= 0:
        return None
    return remaining_bytes(progress) / net


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
    itself at its next dirty sync, and moving it in a pause costs no more than QEMU's own switchover would.

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


def initial_downtime_ms(config: ControllerConfig) -> int:
    """The downtime limit handed to the hypervisor before the copy starts (never above the budget)."""
    return min(config.initial_downtime_ms, config.max_downtime_ms)


def downtime_steps(config: ControllerConfig) -> tuple[int, ...]:
    """The limits the ramp may hand the hypervisor: the initial one, doubled until the budget.

    >>> downtime_steps(ControllerConfig())
    (50, 100, 200, 300)
    >>> downtime_steps(ControllerConfig(max_downtime_ms=1000, initial_downtime_ms=100))
    (100, 200, 400, 800, 1000)
    >>> downtime_steps(ControllerConfig(initial_downtime_ms=300))   # no ramp
    (300,)
    """
    steps = [initial_downtime_ms(config)]
    while steps[-1] < config.max_downtime_ms:
        steps.append(min(steps[-1] * 2, config.max_downtime_ms))
    return tuple(steps)


def next_downtime(progress: Progress, config: ControllerConfig, ramp: DowntimeRamp) -> DowntimeRamp:
    """The downtime limit this snapshot calls for: held while the rounds still shrink, raised when not.

    Judged once per memory round, on the remainder its first snapshot shows (the dirty set the round
    started with). Round 1 is the first pass over all memory. From round 2 on, while the remainder does not
    fit the limit in force, more rounds still pay when they shrink it: when this round started with less
    than ``1 - switchover_min_shrink`` of what the one before started with, and the guest dirties less than
    ``1 - switchover_min_shrink`` of what the link moves (so the next round will shrink it again; a guest
    rewriting a hot set each round dirties about as fast as the link moves, and waiting a round to see it
    would cost a round of bytes), the limit holds. Otherwise more rounds will not shorten the pause: the
    limit goes to the smallest step that fits the remainder at the measured rate (with
    ``switchover_safety``), and at least one step up, since the hypervisor did not take the remainder at the
    limit it had. A throttled guest pays for every round in vCPU time: from round 2 on, at every tick, the
    limit goes to the smallest step that fits the remainder, if that is above the one in force. (A disk
    write limit costs less: it slows writes only, and ends with the mirror's tail; the rounds decide.)
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

    Shrinking so far, but QEMU measures the guest dirtying 900 MiB/s: the next round will not shrink it by
    a fifth, so the limit goes up now rather than a round later.

    >>> next_downtime(replace(p, memory_dirty_rate_bps=900 * MiB), cfg, shrinking).limit(cfg)
    100

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
    before = ramp.round_start_bytes
    ramp = replace(ramp, round=progress.round, round_start_bytes=remaining_bytes(progress))
    if progress.round < 2 or before is None or _ramp_holds(progress, config, before, current):
        return ramp
    higher = [s for s in downtime_steps(config) if s > current] or [config.max_downtime_ms]
    return ramp.raised_to(max(higher[0], _fitting_step(progress, config)), config)


def _fitting_step(progress: Progress, config: ControllerConfig) -> int:
    """The smallest downtime step the remainder fits at the measured rate (the budget if none does)."""
    rate = progress.transfer_rate_bps
    left = remaining_bytes(progress)
    needed_ms = left / rate * 1000.0 / config.switchover_safety if rate > 0 else math.inf
    return next((s for s in downtime_steps(config) if s >= needed_ms), config.max_downtime_ms)


def _ramp_holds(progress: Progress, config: ControllerConfig, before: int, current_ms: int) -> bool:
    """Whether the limit in force still serves (see ``next_downtime``): the remainder fits it (and did not
    fit it when the round before started: a remainder that fitted then and was not taken means the
    hypervisor measures the link slower than we do), or the rounds still shrink it by enough."""
    rate = progress.transfer_rate_bps
    if fits_downtime(progress, config, current_ms):
        return before > rate * current_ms / 1000.0 * config.switchover_safety
    keep = 1.0 - config.switchover_min_shrink
    dirty = progress.memory_dirty_rate_bps + progress.disk_dirty_rate_bps
    return remaining_bytes(progress) <= before * keep and dirty < rate * keep


def disk_write_limit(progress: Progress, config: ControllerConfig) -> int | None:
    """The disk write limit this snapshot calls for, or ``None`` for no limit.

    A new limit only while the disk mirror copies (phase ``DISK``: once libvirt moves on to memory the mirror
    is in sync, and a limit then bought nothing, measured), only when the modified blocks left fit
    ``disk_limit_window_s`` of transfer, and only while the guest dirties the disk at
    ≥ ``disk_fast_write_ratio`` of the transfer rate, so the tail shrinks by less than half a pass. Once a
    limit is in force it stays until the end (the dirty rate then measures the limit, not the guest, so
    re-testing it would flap); it is lifted the moment the migration is done or failed.

    Worked examples (link 1 GiB/s: "few" = under 5 GiB; "fast" = over 512 MiB/s; limit = 102.4 MiB/s):

    >>> cfg = ControllerConfig()
    >>> p = _example(phase=Phase.DISK, transfer_rate_bps=GiB, disk_remaining_bytes=2 * GiB,
    ...              disk_dirty_rate_bps=600 * MiB)
    >>> disk_write_limit(p, cfg) == int(0.1 * GiB)
    True

    The same writes once the mirror is in sync (memory phase): no new limit.

    >>> disk_write_limit(replace(p, phase=Phase.MEMORY), cfg) is None
    True

    Many blocks left (a 40 GiB tail): a limit now would slow the guest for ~40 s. None.

    >>> disk_write_limit(replace(p, disk_remaining_bytes=40 * GiB), cfg) is None
    True

    A log writer at 50 MiB/s: the mirror keeps up without help. None.

    >>> disk_write_limit(replace(p, disk_dirty_rate_bps=50 * MiB), cfg) is None
    True

    Switchover done: always lifted, whatever was in force.

    >>> disk_write_limit(replace(p, phase=Phase.DONE, disk_write_limit_bps=10 * MiB), cfg) is None
    True
    """
    if progress.phase not in (Phase.DISK, Phase.MEMORY, Phase.SWITCHOVER):
        return None
    if progress.disk_write_limit_bps is not None:
        return progress.disk_write_limit_bps
    if not config.disk_limit_enabled or progress.phase is not Phase.DISK:
        return None
    rate = progress.transfer_rate_bps
    if rate <= 0 or progress.disk_remaining_bytes <= 0:
        return None
    few_left = progress.disk_remaining_bytes <= rate * config.disk_limit_window_s
    writes_fast = progress.disk_dirty_rate_bps >= rate * config.disk_fast_write_ratio
    if not (few_left and writes_fast):
        return None
    return max(config.disk_limit_floor_bps, int(rate * config.disk_limit_ratio))


def last_resort_disk_limit(
    progress: Progress, config: ControllerConfig, state: ControllerState
) -> int | None:
    """The disk write limit to apply instead of calling a stall, or None.

    ``disk_write_limit`` waits for few blocks to remain, but a guest that writes its disk faster than its
    share of the link (several migrations on one NIC, a slow link) never lets the remainder get "few": the
    mirror plateaus and the stall rule would abort. Before that happens, when the remainder has made no new
    low for ``stall_timeout_s`` and the guest writes at >= ``disk_fast_write_ratio`` of the transfer rate, the
    limit goes on anyway: the one thing that lets such a copy end. Still temporary, still lifted at the end.

    Worked example: a database writing 1000 MiB/s with a third of a 10 Gbit/s link (~400 MiB/s), its mirror
    stuck at ~7 GiB for 30 s: limit it to 10 % of the link share.

    >>> cfg = ControllerConfig()
    >>> p = _example(phase=Phase.DISK, elapsed_s=100.0, transfer_rate_bps=400 * MiB,
    ...              disk_remaining_bytes=7 * GiB, disk_dirty_rate_bps=1000 * MiB)
    >>> last_resort_disk_limit(p, cfg, ControllerState(best_remaining_at_s=70.0)) == 40 * MiB
    True

    Stuck for 20 s only: not yet.

    >>> last_resort_disk_limit(p, cfg, ControllerState(best_remaining_at_s=80.0)) is None
    True
    """
    if progress.phase not in (Phase.DISK, Phase.MEMORY) or not config.disk_limit_enabled:
        return None
    if progress.disk_write_limit_bps is not None or progress.disk_remaining_bytes <= 0:
        return None
    rate = progress.transfer_rate_bps
    if rate <= 0 or progress.disk_dirty_rate_bps < rate * config.disk_fast_write_ratio:
        return None
    if progress.elapsed_s - state.best_remaining_at_s < config.stall_timeout_s:
        return None
    return max(config.disk_limit_floor_bps, int(rate * config.disk_limit_ratio))


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
    if rate <= 0 or fits_downtime(progress, config):
        return current
    disk_rate = progress.disk_dirty_rate_bps
    if disk_limit_bps is not None:
        disk_rate = min(disk_rate, float(disk_limit_bps))
    dirty = progress.memory_dirty_rate_bps + disk_rate
    if dirty < rate * config.throttle_trigger_ratio:
        return current
    return _throttle_step(dirty, rate, current, config)


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


def decide(progress: Progress, config: ControllerConfig, state: ControllerState) -> Decision:
    """One controller tick: the actions to take now and the state to remember.

    Order matters and is fixed: end-of-migration lifts first; then aborts (timeout, no transfer, stall,
    switchover taking too long); then the downtime limit; then throttles; then switchover. The actions are
    idempotent requests ("limit = X"), so re-sending one the driver already applied is harmless, but only
    changes are emitted.

    Worked example: an idle droplet whose remainder fits the budget copies one more tick while that still
    shrinks it, then switches over.

    >>> cfg = ControllerConfig()
    >>> p = _example(phase=Phase.MEMORY, round=2, transfer_rate_bps=GiB, memory_remaining_bytes=10 * MiB)
    >>> first = decide(p, cfg, ControllerState())
    >>> first.actions
    ()
    >>> second = decide(replace(p, elapsed_s=10.5, memory_remaining_bytes=2 * MiB), cfg, first.state)
    >>> second.actions
    ()
    >>> decide(replace(p, elapsed_s=11.0, memory_remaining_bytes=2 * MiB), cfg, second.state).actions
    (Switchover(),)

    And once done, a disk limit still in force is lifted:

    >>> done = replace(p, phase=Phase.DONE, disk_write_limit_bps=MiB)
    >>> decide(done, ControllerConfig(), ControllerState()).actions
    (SetDiskWriteLimit(bytes_per_s=None),)
    """
    actions: list[Action] = []
    now = progress.elapsed_s

    if progress.phase in (Phase.DONE, Phase.FAILED):
        if progress.disk_write_limit_bps is not None:
            actions.append(SetDiskWriteLimit(None))
        if progress.memory_throttle_pct:
            actions.append(SetMemoryThrottle(0))
        return Decision(tuple(actions), state)

    state = _track(progress, config, state)

    last_resort = last_resort_disk_limit(progress, config, state)
    if last_resort is not None:
        # A fresh stall window for the limit to show its effect, instead of an abort now.
        state = replace(state, best_remaining_at_s=now)

    abort = _abort_reason(progress, config, state)
    if abort is not None:
        return Decision((abort,), state)

    if progress.phase is Phase.SWITCHOVER:
        return Decision((), state)

    ramp = next_downtime(progress, config, state.downtime)
    if ramp.limit(config) != state.downtime.limit(config):
        actions.append(SetMaxDowntime(ramp.limit(config)))
    state = replace(state, downtime=ramp)

    limit = last_resort if last_resort is not None else disk_write_limit(progress, config)
    if limit != progress.disk_write_limit_bps:
        actions.append(SetDiskWriteLimit(limit))
    throttle = memory_throttle(progress, config, state, limit)
    if throttle != progress.memory_throttle_pct:
        actions.append(SetMemoryThrottle(throttle))
        if throttle > progress.memory_throttle_pct:
            # A new step gets a fresh stall window to show its effect.
            state = replace(state, throttle_raised_round=progress.round, best_remaining_at_s=now)

    if should_switchover(progress, config, state.previous_remaining_bytes, ramp.limit(config)):
        actions.append(Switchover())
        state = replace(state, switchover_requested_at_s=now)
    state = replace(state, previous_remaining_bytes=remaining_bytes(progress))
    return Decision(tuple(actions), state)


def _track(progress: Progress, config: ControllerConfig, state: ControllerState) -> ControllerState:
    now = progress.elapsed_s
    left = remaining_bytes(progress)
    best = state.best_remaining_bytes
    # A "new low" must beat the best by 5 % of the smaller of the best and what the link moves in a stall
    # window: 5 % of a 2 TB first pass would take longer than the window at 1 GB/s, and is not a stall.
    window_bytes = max(progress.transfer_rate_bps, 1.0) * config.stall_timeout_s
    if best is None or left < best - config.stall_min_improvement * min(best, window_bytes):
        state = replace(state, best_remaining_bytes=left, best_remaining_at_s=now)
    if best is None or progress.bytes_transferred > state.last_bytes_transferred:
        state = replace(state, last_bytes_transferred=progress.bytes_transferred, last_transfer_at_s=now)
    if progress.phase is Phase.SWITCHOVER and state.switchover_requested_at_s is None:
        state = replace(state, switchover_requested_at_s=now)
    if progress.phase is Phase.MEMORY:
        state = _track_throttle(progress, state)
    return state


def _track_throttle(progress: Progress, state: ControllerState) -> ControllerState:
    """The throttle in force per memory round: the lowest the hypervisor reports during it, or (a driver that
    cannot tell) the level requested when the round's first snapshot came (applied from that round on)."""
    known = progress.memory_throttle_in_force_pct
    now_pct = known if known is not None else progress.memory_throttle_pct
    if progress.round != state.throttle_round:
        last = state.throttle_this_round_pct if progress.round == state.throttle_round + 1 else 0
        return replace(
            state,
            throttle_round=progress.round,
            throttle_this_round_pct=now_pct,
            throttle_last_round_pct=last,
        )
    if known is not None and known < state.throttle_this_round_pct:
        return replace(state, throttle_this_round_pct=known)
    return state


def _abort_reason(progress: Progress, config: ControllerConfig, state: ControllerState) -> Abort | None:
    now = progress.elapsed_s
    timeout_s = completion_timeout_s(config, progress.disk_total_bytes, progress.memory_total_bytes)
    if now >= timeout_s:
        return Abort(AbortReason.TIMEOUT, f"completion timeout {timeout_s:.0f} s passed")
    if progress.phase is Phase.SWITCHOVER and state.switchover_requested_at_s is not None:
        if now - state.switchover_requested_at_s >= config.switchover_timeout_s:
            return Abort(AbortReason.SWITCHOVER_TIMEOUT, "switchover did not finish; resuming the source")
        return None
    if now - state.last_transfer_at_s >= config.no_transfer_timeout_s:
        return Abort(AbortReason.NO_TRANSFER, f"no data moved for {now - state.last_transfer_at_s:.0f} s")
    return _no_progress(progress, config, state)


def _no_progress(progress: Progress, config: ControllerConfig, state: ControllerState) -> Abort | None:
    """A stall with no remedy left, or rates that say memory cannot converge."""
    now = progress.elapsed_s
    can_throttle_more = (
        progress.phase is Phase.MEMORY and progress.memory_throttle_pct < config.throttle_max_pct
    )
    if now - state.best_remaining_at_s >= config.stall_timeout_s and not can_throttle_more:
        return Abort(
            AbortReason.STALLED,
            f"remainder has not shrunk for {now - state.best_remaining_at_s:.0f} s "
            f"(throttle {progress.memory_throttle_pct} %)",
        )
    hopeless = cannot_converge(progress, config, state)
    if hopeless is not None:
        return Abort(AbortReason.NOT_CONVERGING, hopeless)
    return None


def _example(**changes: object) -> Progress:
    """A Progress for the worked examples: 8 GiB disk + 4 GiB memory, nothing left unless given."""
    base = Progress(
        phase=Phase.MEMORY,
        elapsed_s=10.0,
        round=1,
        disk_total_bytes=8 * GiB,
        disk_processed_bytes=8 * GiB,
        disk_remaining_bytes=0,
        memory_total_bytes=4 * GiB,
        memory_processed_bytes=4 * GiB,
        memory_remaining_bytes=0,
        disk_dirty_rate_bps=0.0,
        memory_dirty_rate_bps=0.0,
        transfer_rate_bps=0.0,
    )
    return replace(base, **changes)  # type: ignore[arg-type]
