"""What every hook kind shares: the context it runs in, the result it returns, and its protocol."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from guest_agent.config import HookSpec, Phase
from guest_agent.states import HookOutcome, MigrationKind


@dataclass(frozen=True)
class EventInfo:
    """The event as hooks see it (the JSON on a command's stdin, a webhook's body)."""

    event_id: str
    kind: MigrationKind
    state: str | None = None
    not_before: datetime | None = None
    deadline: datetime | None = None
    simulated: bool = False
    # The service's prediction for the migration, when it gives one.
    expected_downtime_ms: float | None = None
    expected_duration_s: float | None = None

    def to_json(self, phase: Phase, hook: str) -> dict[str, Any]:
        return {
            "event": self.kind.value,
            "id": self.event_id,
            "state": self.state,
            "not_before": _rfc3339(self.not_before),
            "deadline": _rfc3339(self.deadline),
            "phase": phase.value,
            "hook": hook,
            "idempotency_key": idempotency_key(self.event_id, phase, hook),
            "simulated": self.simulated,
            "expected_downtime_ms": self.expected_downtime_ms,
            "expected_duration_s": self.expected_duration_s,
        }

    def environment(self, phase: Phase, hook: str) -> dict[str, str]:
        return {
            "MAINTENANCE_EVENT": self.kind.value,
            "MAINTENANCE_EVENT_ID": self.event_id,
            "MAINTENANCE_DEADLINE": _rfc3339(self.deadline) or "",
            "MAINTENANCE_NOT_BEFORE": _rfc3339(self.not_before) or "",
            "MAINTENANCE_PHASE": phase.value,
            "MAINTENANCE_HOOK": hook,
            "MAINTENANCE_SIMULATED": "1" if self.simulated else "0",
            "MAINTENANCE_EXPECTED_DOWNTIME_MS": _number(self.expected_downtime_ms),
            "MAINTENANCE_EXPECTED_DURATION_S": _number(self.expected_duration_s),
        }


def _number(value: float | None) -> str:
    """A number for a shell: ``1500`` for 1500.0, ``0.25`` as is, empty when unknown."""
    if value is None:
        return ""
    return str(int(value)) if value.is_integer() else repr(value)


def idempotency_key(event_id: str, phase: Phase, hook: str) -> str:
    """``event id:phase:hook`` — the same for every delivery attempt of one hook for one event."""
    return f"{event_id}:{phase.value}:{hook}"


@dataclass(frozen=True)
class HookContext:
    event: EventInfo
    phase: Phase
    data: Mapping[str, Any] = field(default_factory=dict)  # what earlier hooks kept with this event
    monotonic: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    # Called with the pid of each program the hook starts (its own process group): the agent journals it.
    on_process_start: Callable[[int], None] | None = None


@dataclass(frozen=True)
class HookResult:
    outcome: HookOutcome
    detail: str = ""
    data: Mapping[str, Any] | None = None  # merged into the event's journal data when not None

    @classmethod
    def ok(cls, detail: str = "", data: Mapping[str, Any] | None = None) -> HookResult:
        return cls(HookOutcome.OK, detail, data)

    @classmethod
    def failed(cls, detail: str) -> HookResult:
        return cls(HookOutcome.FAILED, detail)

    @classmethod
    def cut(cls, detail: str) -> HookResult:
        return cls(HookOutcome.CUT, detail)


class Hook(Protocol):
    @property
    def spec(self) -> HookSpec: ...

    def run(self, ctx: HookContext, timeout_s: float) -> HookResult:
        """Do the hook's work within ``timeout_s``; never raise for a failure of the work itself."""
        ...

    def describe(self, phase: Phase) -> str:
        """One line saying what ``run`` would do (``simulate --dry-run``)."""
        ...


def _rfc3339(when: datetime | None) -> str | None:
    return when.isoformat().replace("+00:00", "Z") if when is not None else None
