"""The convergence controller: the policy of a live migration, as small pure functions.

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
the actions and sleeps is ``host_engine.attempt.run_migration``. One module per concern, all re-exported
here: ``controller_config`` (tunables and their defaults), ``controller_state`` (what is remembered between
ticks, the downtime limit's stages), ``controller_downtime`` (switchover and the downtime ramp),
``controller_disk`` (the disk write limit), ``controller_throttle`` (the vCPU throttle, non-convergence).

Defaults come from real live migrations between two libvirt hosts on one machine (libvirt 9.0, QEMU 7.2,
TCG guests); the comment on each (``controller_config``) says what it rests on.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from host_engine.controller_config import (
    DEFAULT_CONVERGE_MAX_ROUNDS,
    DEFAULT_DISK_FAST_WRITE_RATIO,
    DEFAULT_DISK_LIMIT_FLOOR_BPS,
    DEFAULT_DISK_LIMIT_RATIO,
    DEFAULT_DISK_LIMIT_WINDOW_S,
    DEFAULT_INITIAL_DOWNTIME_MS,
    DEFAULT_MAX_DOWNTIME_MS,
    DEFAULT_NO_TRANSFER_TIMEOUT_S,
    DEFAULT_STALL_MIN_IMPROVEMENT,
    DEFAULT_STALL_TIMEOUT_S,
    DEFAULT_SWITCHOVER_MIN_SHRINK,
    DEFAULT_SWITCHOVER_SAFETY,
    DEFAULT_SWITCHOVER_TARGET_MS,
    DEFAULT_SWITCHOVER_TIMEOUT_S,
    DEFAULT_THROTTLE_JUMP_RATIO,
    DEFAULT_THROTTLE_MAX_PCT,
    DEFAULT_THROTTLE_START_ROUND,
    DEFAULT_THROTTLE_STEP_PCT,
    DEFAULT_THROTTLE_TARGET_RATIO,
    DEFAULT_THROTTLE_TRIGGER_RATIO,
    DEFAULT_TIMEOUT_FLOOR_S,
    DEFAULT_TIMEOUT_S_PER_GIB,
    ControllerConfig,
    GiB,
    MiB,
    downtime_steps,
    initial_downtime_ms,
)
from host_engine.controller_config import example_progress as _example  # noqa: F401 - doctests use it
from host_engine.controller_disk import disk_write_limit, last_resort_disk_limit
from host_engine.controller_downtime import (
    fits_downtime,
    next_downtime,
    remaining_bytes,
    should_switchover,
)
from host_engine.controller_state import ControllerState, DowntimeRamp, DowntimeStage
from host_engine.controller_throttle import cannot_converge, memory_throttle, rounds_to_fit
from host_engine.drivers.base import Phase, Progress

__all__ = [
    "DEFAULT_CONVERGE_MAX_ROUNDS",
    "DEFAULT_DISK_FAST_WRITE_RATIO",
    "DEFAULT_DISK_LIMIT_FLOOR_BPS",
    "DEFAULT_DISK_LIMIT_RATIO",
    "DEFAULT_DISK_LIMIT_WINDOW_S",
    "DEFAULT_INITIAL_DOWNTIME_MS",
    "DEFAULT_MAX_DOWNTIME_MS",
    "DEFAULT_NO_TRANSFER_TIMEOUT_S",
    "DEFAULT_STALL_MIN_IMPROVEMENT",
    "DEFAULT_STALL_TIMEOUT_S",
    "DEFAULT_SWITCHOVER_MIN_SHRINK",
    "DEFAULT_SWITCHOVER_SAFETY",
    "DEFAULT_SWITCHOVER_TARGET_MS",
    "DEFAULT_SWITCHOVER_TIMEOUT_S",
    "DEFAULT_THROTTLE_JUMP_RATIO",
    "DEFAULT_THROTTLE_MAX_PCT",
    "DEFAULT_THROTTLE_START_ROUND",
    "DEFAULT_THROTTLE_STEP_PCT",
    "DEFAULT_THROTTLE_TARGET_RATIO",
    "DEFAULT_THROTTLE_TRIGGER_RATIO",
    "DEFAULT_TIMEOUT_FLOOR_S",
    "DEFAULT_TIMEOUT_S_PER_GIB",
    "NONCONVERGING",
    "Abort",
    "AbortReason",
    "Action",
    "ControllerConfig",
    "ControllerState",
    "Decision",
    "DowntimeRamp",
    "DowntimeStage",
    "GiB",
    "MiB",
    "SetDiskWriteLimit",
    "SetMaxDowntime",
    "SetMemoryThrottle",
    "Switchover",
    "cannot_converge",
    "completion_timeout_s",
    "decide",
    "disk_write_limit",
    "downtime_steps",
    "eta_s",
    "fits_downtime",
    "initial_downtime_ms",
    "last_resort_disk_limit",
    "memory_throttle",
    "next_downtime",
    "remaining_bytes",
    "rounds_to_fit",
    "should_switchover",
]


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


@dataclass(frozen=True)
class Decision:
    actions: tuple[Action, ...]
    state: ControllerState


# --- The policy: one tick ----------------------------------------------------------------------------------


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
    raised = ramp.limit(config) != state.downtime.limit(config)
    if raised:
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

    # Not in the tick that raised the limit: QEMU gets a tick to switch by itself, sending the remainder at
    # line rate; paused by us, it still sends at the bandwidth cap until its next check (measured: 4.8 MiB
    # at 32 MiB/s, 131-178 ms downtime against 28-43 for the baselines).
    if not raised and should_switchover(progress, config, state.previous_remaining_bytes, ramp.limit(config)):
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
            round_start_bytes=remaining_bytes(progress) if progress.round >= 2 else None,
            previous_round_start_bytes=state.round_start_bytes,
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
