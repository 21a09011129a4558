"""A migration's timeline for ``host-engine report``: its progress rows, and what is marked on them.

``timeline`` gives the progress rows (every kept sample, ``host_engine.samples``, with the logged changes);
``attempt_marks`` reads from the log where each attempt started, switched over (and with what downtime), and
how it ended (and why, when it failed), so the plot and the table can say "switchover, downtime 74 ms" or
"attempt 1 failed: stalled" at the right place without the reader digging through the log.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from host_engine.models import LogEntry
from host_engine.samples import sample_rows
from host_engine.states import LogKind, MigrationState

if TYPE_CHECKING:
    from host_engine.store import Store

#: Phases that mean the source was paused for the last copy (``done``: the attempt completed).
SWITCHOVER_PHASES = frozenset({"switchover", "done"})
_STARTS = (MigrationState.RUNNING, MigrationState.OFFLINE_RUNNING)


@dataclass(frozen=True)
class AttemptMark:
    """One attempt's events, on its own clock (seconds since it started)."""

    attempt: int
    completed: bool | None  # None: still running (or the outcome is not recorded yet)
    switchover_s: float | None  # the first sample that saw the switchover
    end_s: float | None  # the attempt's last sample
    downtime_ms: float | None
    reason: str | None  # why it failed

    @property
    def label(self) -> str:
        """A short text for the plot: "switchover, downtime 74 ms" / "attempt 2 failed: stalled"."""
        if self.completed is False:
            return f"attempt {self.attempt} failed: {self.reason or 'no reason recorded'}"
        if self.downtime_ms is not None:
            return f"switchover, downtime {self.downtime_ms:.0f} ms"
        return "switchover"

    def describe(self) -> str:
        """One line for ``host-engine report``."""
        if self.completed is None:
            return f"attempt {self.attempt}: running"
        if self.completed is False:
            where = "" if self.end_s is None else f" after {self.end_s:.1f} s"
            return f"attempt {self.attempt}: failed{where}: {self.reason or 'no reason recorded'}"
        at = "" if self.switchover_s is None else f" at {self.switchover_s:.1f} s"
        downtime = "" if self.downtime_ms is None else f", downtime {self.downtime_ms:.0f} ms"
        return f"attempt {self.attempt}: completed, switchover{at}{downtime}"


def _float(data: Mapping[str, object], key: str) -> float | None:
    value = data.get(key)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def attempt_marks(
    entries: Sequence[LogEntry],
    rows: Sequence[Mapping[str, object]],
    last_attempt: Mapping[str, object] | None,
) -> list[AttemptMark]:
    """The marks of every attempt, from the migration's log ``entries``, its progress ``rows`` (from
    ``timeline``) and ``stats["last_attempt"]`` (the completed attempt's figures)."""
    ends: dict[int, tuple[bool, Mapping[str, object], str]] = {}
    attempt = 0
    for e in entries:
        if e.to_state in _STARTS:
            attempt += 1
        elif e.to_state is MigrationState.FAILED:
            ends[attempt] = (False, e.data, e.message)
        elif e.to_state is MigrationState.COMPLETED:
            ends[attempt] = (True, last_attempt or {}, e.message)
    marks = []
    for n in range(1, attempt + 1):
        mine = [r for r in rows if r.get("attempt") == n]
        switch = next((r for r in mine if r.get("phase") in SWITCHOVER_PHASES), None)
        completed, data, message = ends.get(n, (None, {}, ""))
        reason = None
        if completed is False:
            text = data.get("reason")
            reason = str(text) if text else message.partition(": ")[2].partition(";")[0] or None
        downtime = _float(data, "downtime_ms") if completed else None
        if downtime is None and switch is not None:
            downtime = next((d for r in mine if (d := _float(r, "downtime_ms")) is not None), None)
        marks.append(
            AttemptMark(
                attempt=n,
                completed=completed,
                switchover_s=None if switch is None else _float(switch, "elapsed_s"),
                end_s=_float(mine[-1], "elapsed_s") if mine else None,
                downtime_ms=downtime,
                reason=reason,
            )
        )
    return marks


def timeline(store: Store, migration_id: str, *, dense: bool = True) -> list[dict[str, object]]:
    """The recorded progress of a migration, oldest first, for ``host-engine report`` (rounds, remaining
    bytes, rate, throttle and disk limit over time), attempt by attempt: every kept sample
    (``host_engine.samples``) merged with the logged changes, or with ``dense=False`` the logged changes
    only (one row per change of phase, round, throttle or disk limit). A sample's ``at`` is its attempt's
    start plus its ``elapsed_s``; migrations recorded before samples were kept have the changes only."""
    entries = store.migration_log(migration_id)
    changes: dict[int, list[dict[str, object]]] = {}
    started: dict[int, datetime] = {}
    attempt = 0
    for e in entries:
        if e.to_state in (MigrationState.RUNNING, MigrationState.OFFLINE_RUNNING):
            attempt += 1
            started[attempt] = e.at
        if e.kind == LogKind.PROGRESS:
            changes.setdefault(attempt, []).append({"at": e.at.isoformat(), "attempt": attempt, **e.data})
    samples = sample_rows(store.get_migration(migration_id).stats) if dense else {}
    rows: list[dict[str, object]] = []
    for n in sorted(changes.keys() | (samples.keys() & started.keys())):
        logged = changes.get(n, [])
        # A sample is a logged change when both say the same instant and phase; a switchover ordered at a
        # tick shares that tick's time with the last copying sample and is kept beside it.
        seen = {(r.get("elapsed_s"), r.get("phase")) for r in logged}
        start = started.get(n)
        extra = [
            {"at": (start + timedelta(seconds=_seconds(s))).isoformat(), "attempt": n, **s}
            for s in samples.get(n, [])
            if start is not None and (s.get("elapsed_s"), s.get("phase")) not in seen
        ]
        rows += sorted(logged + extra, key=_seconds)
    return rows


def _seconds(row: dict[str, object]) -> float:
    value = row.get("elapsed_s")
    return float(value) if isinstance(value, int | float) else 0.0
