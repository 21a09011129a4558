"""Each attempt's progress samples, dense and bounded, for ``host-engine report`` (``--plot``, ``--json``).

The executor logs a progress line only when the phase, round, throttle or disk limit changes, so a plot drawn
from those alone joins a long disk copy's first and last points with a straight line. Every controller sample
(one per tick: 0.5-1 s) is therefore also kept here, in memory, and written with the progress the executor
records anyway (``migrations.stats["samples"]``, no transaction of its own), so nothing is added to the hot
path but a list append.

Bounded: an attempt keeps every sample until it has ``MAX_SAMPLES_PER_ATTEMPT``; then every other one goes and
from then on only every 2nd sample is kept (then every 4th, ...), so an attempt of any length keeps between
half the cap and the cap, evenly spread over it, plus the first and the last sample of each phase.
At a 1 s tick, attempts up to ~7 minutes keep every sample; a one-hour attempt one every ~10 s.

Stored per attempt as columns of numbers (``FIELDS`` in order), small enough to be rewritten with the rest of
the migration's stats (about 40 KB at the cap).

Every completed attempt has a sample in the ``switchover`` phase, at the time the guest was paused: a
hypervisor may pause and complete between two ticks (the simulator always does; libvirt's completion can
arrive before any tick saw the pause), and then ``switchover_sample`` derives it from the completed job's own
figures (it ended at ``elapsed_s`` after a pause of ``downtime_ms``), so the report can mark the switchover
where it happened.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from host_engine.drivers.base import Phase

#: Where the samples live in ``migrations.stats``: ``[{"attempt": n, "fields": [...], "rows": [...]}, ...]``.
SAMPLES_KEY = "samples"
#: Samples kept per attempt (see the module docstring for how they are thinned past it).
MAX_SAMPLES_PER_ATTEMPT = 400
#: What each sample keeps, in this order (``executor.progress_dict``'s names).
FIELDS = (
    "elapsed_s",
    "phase",
    "round",
    "disk_total_bytes",
    "disk_remaining_bytes",
    "memory_total_bytes",
    "memory_remaining_bytes",
    "transfer_rate_bps",
    "disk_dirty_rate_bps",
    "memory_dirty_rate_bps",
    "memory_throttle_pct",
    "disk_write_limit_bps",
    "downtime_ms",
    "bytes_transferred",
    "eta_s",
)
_ELAPSED, _PHASE = FIELDS.index("elapsed_s"), FIELDS.index("phase")
#: Counters read off the straight line between the last reading and the end for a derived switchover sample.
_INTERPOLATED = ("disk_remaining_bytes", "memory_remaining_bytes", "bytes_transferred")


@dataclass
class SampleBuffer:
    """One attempt's samples (progress as plain values), thinned to stay within ``cap``."""

    attempt: int
    cap: int = MAX_SAMPLES_PER_ATTEMPT
    rows: list[tuple[object, ...]] = field(default_factory=list)
    # Indexes in ``rows`` of each phase's first sample: never thinned away.
    _firsts: set[int] = field(default_factory=set)
    stride: int = 1
    _skipped: int = 0
    # The latest sample when thinning skipped it: the attempt's end is always shown.
    _tail: tuple[object, ...] | None = None

    def add(self, sample: Mapping[str, object]) -> None:
        """Keep ``sample`` (every ``stride``-th one; always the first of a new phase). A completed attempt's
        last sample (``done``) comes after a ``switchover`` one: derived (``switchover_sample``) when no
        tick saw the switchover."""
        if sample.get("phase") == Phase.DONE.value and not self._saw(Phase.SWITCHOVER.value):
            latest = self._tail or (self.rows[-1] if self.rows else None)
            before = None if latest is None else dict(zip(FIELDS, latest, strict=True))
            self._add_row(_row(switchover_sample(before, sample)))
        self._add_row(_row(sample))

    def _saw(self, phase: str) -> bool:
        # The first sample of each phase is never thinned away, nor skipped (a new phase is always kept).
        return any(self.rows[i][_PHASE] == phase for i in self._firsts)

    def _add_row(self, row: tuple[object, ...]) -> None:
        if self.rows and self._tail is None and row[:2] == self.rows[-1][:2]:
            self.rows[-1] = row  # read again at the same instant (a tick that did not advance): the fresher
            return
        new_phase = not self.rows or row[1] != self.rows[-1][1]
        if not new_phase and self._skipped + 1 < self.stride:
            self._skipped += 1
            self._tail = row
            return
        if new_phase and self._tail is not None:
            self.rows.append(self._tail)  # the previous phase's last reading: where its line ends
        self._skipped, self._tail = 0, None
        if new_phase:
            self._firsts.add(len(self.rows))
        self.rows.append(row)
        if len(self.rows) > self.cap:
            self._thin()

    def _thin(self) -> None:
        """Drop every other sample (keeping each phase's first) and keep every 2x-th from now on."""
        kept: list[tuple[object, ...]] = []
        firsts: set[int] = set()
        for i, row in enumerate(self.rows):
            if i in self._firsts:
                firsts.add(len(kept))
                kept.append(row)
            elif i % 2 == 0 or i == len(self.rows) - 1:
                kept.append(row)
        self.rows, self._firsts = kept, firsts
        self.stride *= 2

    def to_json(self) -> dict[str, Any]:
        rows = [*self.rows, *([self._tail] if self._tail is not None else [])]
        return {"attempt": self.attempt, "fields": list(FIELDS), "rows": [list(r) for r in rows]}

    def __len__(self) -> int:
        return len(self.rows) + (self._tail is not None)


def _row(sample: Mapping[str, object]) -> tuple[object, ...]:
    return tuple(sample.get(f) for f in FIELDS)


def _number(sample: Mapping[str, object] | None, key: str) -> float | None:
    value = None if sample is None else sample.get(key)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def switchover_sample(latest: Mapping[str, object] | None, done: Mapping[str, object]) -> dict[str, object]:
    """The switchover a completed attempt went through, as a sample, when no tick saw it: ``done`` is the
    completed job's sample (it ended at ``elapsed_s``, the guest paused for ``downtime_ms`` before that),
    ``latest`` the last sample before it (the guest still running).

    The pause began at ``elapsed_s - downtime_ms``, never before ``latest`` (a tick saw the guest running
    then); without a downtime, at the end. Remaining and sent bytes are read off the straight line from
    ``latest`` to ``done`` (nothing more is known between them); throttle, limit and rates are ``latest``'s
    (in force until the pause).

    >>> s = switchover_sample({"elapsed_s": 14.0, "phase": "memory", "memory_remaining_bytes": 200},
    ...                       {"elapsed_s": 14.5, "phase": "done", "memory_remaining_bytes": 0,
    ...                        "downtime_ms": 250.0})
    >>> s["phase"], s["elapsed_s"], s["memory_remaining_bytes"], s["downtime_ms"]
    ('switchover', 14.25, 100, 250.0)
    """
    end_s = _number(done, "elapsed_s") or 0.0
    downtime_ms = _number(done, "downtime_ms")
    at_s = end_s if downtime_ms is None else end_s - downtime_ms / 1000
    start_s = _number(latest, "elapsed_s")
    if start_s is not None:
        at_s = min(end_s, max(at_s, start_s))
    sample = {**(latest or done), "phase": Phase.SWITCHOVER.value, "elapsed_s": round(at_s, 2)}
    sample.update(
        round=done.get("round", sample.get("round")), downtime_ms=done.get("downtime_ms"), eta_s=None
    )
    for key in _INTERPOLATED:
        before, after = _number(latest, key), _number(done, key)
        if before is None or after is None or start_s is None or end_s <= start_s:
            sample[key] = done.get(key) if latest is None else sample.get(key)
            continue
        sample[key] = round(before + (after - before) * (at_s - start_s) / (end_s - start_s))
    return sample


def with_samples(stats: Mapping[str, Any], buffer: SampleBuffer) -> list[dict[str, Any]]:
    """``stats``' samples with ``buffer``'s attempt put in (replacing what an earlier write of it left)."""
    blocks = [dict(b) for b in _blocks(stats) if b.get("attempt") != buffer.attempt]
    return [*blocks, buffer.to_json()]


def sample_rows(stats: Mapping[str, Any]) -> dict[int, list[dict[str, object]]]:
    """The stored samples, per attempt, as progress rows (``FIELDS`` by name). A block written with other
    fields (an older or newer engine) is read by the names it carries; anything unreadable is skipped."""
    out: dict[int, list[dict[str, object]]] = {}
    for block in _blocks(stats):
        attempt, fields, rows = block.get("attempt"), block.get("fields"), block.get("rows")
        if not isinstance(attempt, int) or not isinstance(fields, list) or not isinstance(rows, list):
            continue
        out[attempt] = [dict(zip(fields, row, strict=False)) for row in rows if isinstance(row, list)]
    return out


def _blocks(stats: Mapping[str, Any]) -> Sequence[Mapping[str, Any]]:
    blocks = stats.get(SAMPLES_KEY)
    return [b for b in blocks if isinstance(b, Mapping)] if isinstance(blocks, list) else []
