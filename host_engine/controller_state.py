"""What the convergence controller remembers between ticks (``ControllerState``), and the downtime limit's
state machine (``DowntimeStage``, ``DowntimeRamp``; the rule that moves it: ``controller_downtime``)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from host_engine.controller_config import ControllerConfig, initial_downtime_ms


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
    # The remainder at the first snapshot of the current memory round and of the one before (the dirty sets
    # the rounds started with; None for round 1, the first pass, and before).
    round_start_bytes: int | None = None
    previous_round_start_bytes: int | None = None
    switchover_requested_at_s: float | None = None
    previous_remaining_bytes: int | None = None
    downtime: DowntimeRamp = DowntimeRamp()
