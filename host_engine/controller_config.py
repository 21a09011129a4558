"""The convergence controller's tunables (``ControllerConfig``) and their defaults, each from a measurement.

Defaults come from real live migrations between two libvirt hosts on one machine (libvirt 9.0, QEMU 7.2,
TCG guests); the comment on each says what it rests on. The policy that uses them: ``host_engine.controller``.
"""

from __future__ import annotations

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


def example_progress(**changes: object) -> Progress:
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
