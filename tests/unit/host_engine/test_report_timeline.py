"""``host-engine report``'s marks and plot: switchover with its downtime, a failure with its reason, and no
empty throttle panel when nothing was throttled."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from host_engine.errors import InvalidInput
from host_engine.models import LogEntry
from host_engine.plot import build_figure, plot_timeline
from host_engine.states import MigrationState as S
from host_engine.timeline import AttemptMark, attempt_marks

pytest.importorskip("matplotlib", reason="the 'plot' extra: pip install -e '.[plot]'")

T0 = datetime(2026, 12, 1, tzinfo=UTC)
MIB = 1024 * 1024


def entry(
    n: int, at_s: float, to: S | None, message: str = "", data: dict[str, object] | None = None
) -> LogEntry:
    return LogEntry(n, "m1", "d1", T0 + timedelta(seconds=at_s), "transition" if to else "progress",
                    None, to, message, data or {})  # fmt: skip


def row(attempt: int, at_s: float, elapsed: float, phase: str, **kw: object) -> dict[str, object]:
    at = (T0 + timedelta(seconds=at_s)).isoformat()
    base: dict[str, object] = {
        "at": at, "attempt": attempt, "elapsed_s": elapsed, "phase": phase, "round": 1,
        "disk_remaining_bytes": 0, "memory_remaining_bytes": 64 * MIB, "memory_throttle_pct": 0,
        "disk_write_limit_bps": None, "downtime_ms": None,
    }  # fmt: skip
    base.update(kw)
    return base


def failed_then_completed() -> tuple[list[LogEntry], list[dict[str, object]], dict[str, object]]:
    entries = [
        entry(1, 0, S.RUNNING),
        entry(
            2,
            40,
            S.FAILED,
            "attempt 1 failed: stalled: no new low for 30 s; d1 still on h1",
            {"reason": "stalled: no new low for 30 s", "outcome": "aborted"},
        ),
        entry(3, 40, S.NOTIFIED),
        entry(4, 100, S.RUNNING),
        entry(5, 103, S.COMPLETED, "completed: d1 now on h3 (downtime 74 ms, 3.1 s)"),
    ]
    rows = [row(1, t, t, "memory", memory_throttle_pct=40 if t > 10 else 0) for t in range(0, 41, 2)]
    rows += [row(2, 100 + t / 2, t / 2, "memory") for t in range(6)]
    rows += [row(2, 103, 3.0, "switchover"), row(2, 103.1, 3.1, "done", memory_remaining_bytes=0)]
    return entries, rows, {"downtime_ms": 74.0, "outcome": "completed"}


def test_marks_say_where_each_attempt_switched_over_or_failed_and_why() -> None:
    entries, rows, last = failed_then_completed()
    first, second = attempt_marks(entries, rows, last)
    assert first == AttemptMark(1, False, None, 40.0, None, "stalled: no new low for 30 s")
    assert first.describe() == "attempt 1: failed after 40.0 s: stalled: no new low for 30 s"
    assert second == AttemptMark(2, True, 3.0, 3.1, 74.0, None)
    assert second.describe() == "attempt 2: completed, switchover at 3.0 s, downtime 74 ms"


def test_a_failure_without_data_takes_its_reason_from_the_log_message() -> None:
    entries = [entry(1, 0, S.RUNNING), entry(2, 5, S.FAILED, "attempt 1 failed: target h2 crashed; d1 on h1")]
    (mark,) = attempt_marks(entries, [row(1, 5, 5.0, "disk")], None)
    assert mark.reason == "target h2 crashed" and mark.completed is False


def _texts(fig: object) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in ax.texts]  # type: ignore[attr-defined]


def test_plot_marks_switchover_downtime_and_failure_reason() -> None:
    entries, rows, last = failed_then_completed()
    fig = build_figure(rows, title="m1", marks=attempt_marks(entries, rows, last))
    texts = _texts(fig)
    assert "switchover, downtime 74 ms" in texts
    assert "attempt 1 failed: stalled: no new low for 30 s" in texts
    assert len(fig.axes) == 2  # attempt 1 was throttled: the throttle panel is there


def test_no_throttle_panel_when_nothing_was_throttled_or_limited(tmp_path: Path) -> None:
    rows = [row(1, t, t, "disk" if t < 3 else "memory") for t in range(6)] + [row(1, 6, 6.0, "done")]
    entries = [entry(1, 0, S.RUNNING), entry(2, 6, S.COMPLETED)]
    marks = attempt_marks(entries, rows, {"downtime_ms": 20.0})
    fig = build_figure(rows, title="m1", marks=marks)
    assert len(fig.axes) == 1
    legend = fig.axes[0].get_legend()
    assert "no throttle, no disk write limit" in [t.get_text() for t in legend.get_texts()]
    out = plot_timeline(rows, tmp_path / "t.png", title="m1", marks=marks)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_disk_limit_alone_gets_the_lower_panel() -> None:
    rows = [row(1, t, t, "disk", disk_write_limit_bps=2 * MIB if t > 2 else None) for t in range(6)]
    assert len(build_figure(rows, title="m1").axes) == 3  # throttle axis and its twin for the limit


def test_nothing_to_plot_and_unwritable_paths_are_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="nothing to plot"):
        build_figure([], title="m1")
    with pytest.raises(InvalidInput, match="cannot write the plot"):
        plot_timeline([row(1, 0, 0.0, "disk")], tmp_path / "missing" / "t.png", title="m1")
