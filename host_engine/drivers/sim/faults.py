"""Faults the simulator can inject into a migration: a link drop (or flap), a target crash, a source error."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from host_engine.drivers.base import Phase


class FaultKind(enum.Enum):
    LINK_DROP = "link_drop"  # no byte crosses any more; the controller's stall / no-transfer rules catch it
    TARGET_CRASH = "target_crash"  # the target host dies; the retry should pick another target
    SOURCE_ERROR = "source_error"  # the source's migration job errors out; the source keeps running


@dataclass(frozen=True)
class Fault:
    """Fire ``kind`` once the migration has spent ``after_s`` in ``phase``. A link drop with ``duration_s``
    is a flap: the link comes back after that long (None: it stays down)."""

    kind: FaultKind
    phase: Phase
    after_s: float = 0.0
    duration_s: float | None = None


FAULT_PHASES = (Phase.PREPARING, Phase.DISK, Phase.MEMORY, Phase.SWITCHOVER)


def fault_to_dict(f: Fault) -> dict[str, Any]:
    return {"kind": f.kind.value, "phase": f.phase.value, "after_s": f.after_s, "duration_s": f.duration_s}


def fault_from_dict(d: dict[str, Any]) -> Fault:
    return Fault(FaultKind(d["kind"]), Phase(d["phase"]), d["after_s"], d.get("duration_s"))
