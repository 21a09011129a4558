"""``host-engine report MIGRATION --plot FILE.png``: remaining bytes, switchovers, failures and throttle over
time, as a PNG.

matplotlib is the optional extra ``plot``; it is imported here only, lazily, and drawn with the Agg canvas
on a ``Figure`` of our own (no pyplot: no global figure state, no display needed). Without it the CLI
prints one line saying what to install.

The input is ``host_engine.timeline.timeline``: every kept progress sample and logged change (phase, round,
throttle, disk limit), attempt by attempt, each with the attempt's ``elapsed_s``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from host_engine.errors import ConfigError, InvalidInput
from host_engine.timeline import AttemptMark

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

MIB = 1024 * 1024
GIB = 1024 * MIB
INSTALL_HINT = "pip install 'droplet-live-migration[plot]'"
# 10 x 6 inches at 100 dpi: readable in a ticket or a chat without zooming.
FIGURE_SIZE_IN = (10.0, 6.0)
FIGURE_DPI = 100


def _number(row: Mapping[str, object], key: str) -> float | None:
    value = row.get(key)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _at_s(row: Mapping[str, object]) -> float | None:
    at = row.get("at")
    if not isinstance(at, str):
        return None
    try:
        return datetime.fromisoformat(at).timestamp()
    except ValueError:
        return None


def time_axis_s(rows: Sequence[Mapping[str, object]]) -> tuple[list[float], list[float]]:
    """Seconds since the first attempt started, for each row; and where each attempt starts.

    Within an attempt the rows' ``elapsed_s`` is exact (the driver's clock); attempts are placed by the
    wall time they were logged at, never overlapping the previous one.

    >>> time_axis_s([{"attempt": 1, "elapsed_s": 0.0, "at": "2026-12-01T00:00:00+00:00"},
    ...              {"attempt": 1, "elapsed_s": 4.0, "at": "2026-12-01T00:00:04+00:00"},
    ...              {"attempt": 2, "elapsed_s": 1.0, "at": "2026-12-01T00:01:01+00:00"}])
    ([0.0, 4.0, 61.0], [0.0, 60.0])
    """
    xs: list[float] = []
    starts: list[float] = []
    first_at: float | None = None
    attempt: object = object()
    base = 0.0
    for row in rows:
        elapsed = _number(row, "elapsed_s") or 0.0
        at = _at_s(row)
        if row.get("attempt") != attempt:
            attempt = row.get("attempt")
            previous_end = xs[-1] if xs else 0.0
            if at is not None and first_at is None:
                first_at = at - elapsed
            start = (at - elapsed - first_at) if at is not None and first_at is not None else previous_end
            base = max(start, previous_end)
            starts.append(base)
        xs.append(base + elapsed)
    return xs, starts


def _with_gaps(
    rows: Sequence[Mapping[str, object]], xs: Sequence[float]
) -> tuple[list[float], list[Mapping[str, object] | None]]:
    """The rows with a gap (``None``) where each retry starts, so no line joins one attempt's end to the next
    one's start: in between, the source ran on its own, unthrottled, and nothing was being copied."""
    out_x: list[float] = []
    out_rows: list[Mapping[str, object] | None] = []
    for i, (x, row) in enumerate(zip(xs, rows, strict=True)):
        if i and row.get("attempt") != rows[i - 1].get("attempt"):
            out_x.append(out_x[-1])  # at the attempt's last point: a step line stops there too
            out_rows.append(None)
        out_x.append(x)
        out_rows.append(row)
    return out_x, out_rows


def _series(
    rows: Sequence[Mapping[str, object] | None], key: str, scale: float, *, missing: float = 0.0
) -> list[float]:
    """``key`` of each row divided by ``scale`` (``missing`` where a row lacks it); NaN, which matplotlib
    leaves out, for a gap."""
    out = []
    for row in rows:
        value = None if row is None else _number(row, key)
        if row is None:
            out.append(math.nan)
        else:
            out.append(missing if value is None else value / scale)
    return out


def plot_timeline(
    rows: Sequence[Mapping[str, object]],
    path: str | Path,
    *,
    title: str,
    marks: Sequence[AttemptMark] = (),
) -> Path:
    """Draw the timeline (see :func:`build_figure`) into the PNG ``path``. Raises ``ConfigError`` without
    matplotlib, ``InvalidInput`` when there is nothing to draw or the file cannot be written."""
    fig = build_figure(rows, title=title, marks=marks)
    out = Path(path)
    try:
        fig.savefig(out, format="png")
    except OSError as e:
        raise InvalidInput(f"cannot write the plot to {out}: {e.strerror or e}", field="plot") from e
    return out


def build_figure(
    rows: Sequence[Mapping[str, object]], *, title: str, marks: Sequence[AttemptMark] = ()
) -> Figure:
    """Remaining disk and memory bytes over time (top), each attempt's switchover (with its downtime) and
    failure (with its reason) marked; below, the memory throttle and disk write limit, only when either was
    applied (an empty panel would only say "nothing happened" in a confusing way)."""
    if not rows:
        raise InvalidInput("no progress recorded yet: nothing to plot", field="plot")
    figure_cls, canvas_cls = _matplotlib()
    x_rows, starts = time_axis_s(rows)
    xs, gapped = _with_gaps(rows, x_rows)
    biggest = max(
        (_number(r, k) or 0.0 for r in rows for k in ("disk_remaining_bytes", "memory_remaining_bytes")),
        default=0.0,
    )
    unit, unit_name = (GIB, "GiB") if biggest >= 10 * GIB else (MIB, "MiB")
    disk = _series(gapped, "disk_remaining_bytes", unit)
    memory = _series(gapped, "memory_remaining_bytes", unit)
    throttle = _series(gapped, "memory_throttle_pct", 1)
    limit = _series(gapped, "disk_write_limit_bps", MIB, missing=math.nan)  # no limit: no line
    throttled = any(v > 0 for v in throttle if not math.isnan(v))
    limited = any(not math.isnan(v) for v in limit)

    fig = figure_cls(figsize=FIGURE_SIZE_IN, dpi=FIGURE_DPI)
    canvas_cls(fig)
    if throttled or limited:
        top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    else:
        top, bottom = fig.subplots(1, 1), None
    top.plot(xs, disk, marker=".", markersize=3, label="disk remaining")
    top.plot(xs, memory, marker=".", markersize=3, label="memory remaining")
    top.set_ylabel(f"remaining ({unit_name})")
    top.set_ylim(bottom=0)
    top.set_title(title)
    _mark_attempts(top, marks, starts)
    if bottom is None:
        top.plot([], [], " ", label="no throttle, no disk write limit")
    top.legend(loc="best")
    axes = [top]
    if bottom is not None:
        axes.append(bottom)
        # Throttle and limit hold from one sample to the next: steps, not slopes.
        bottom.step(xs, throttle, where="post", color="tab:red", label="memory throttle (%)")
        bottom.set_ylabel("vCPU throttle (%)")
        bottom.set_ylim(0, 100)
        handles = bottom.get_legend_handles_labels()[0]
        if limited:
            limits = bottom.twinx()
            limits.step(xs, limit, where="post", color="tab:purple", label="disk write limit (MiB/s)")
            limits.set_ylabel("disk write limit (MiB/s)")
            # Headroom above the highest limit keeps its line clear of the legend.
            limits.set_ylim(0, 1.5 * max(v for v in limit if not math.isnan(v)))
            handles += limits.get_legend_handles_labels()[0]
        bottom.legend(handles=handles, loc="upper right")
    axes[-1].set_xlabel("seconds since the first attempt started")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        for start in starts[1:]:  # a retry: where the next attempt began
            ax.axvline(start, color="grey", linestyle="--", linewidth=1)
    fig.tight_layout()
    return fig


def _mark_attempts(ax: Axes, marks: Sequence[AttemptMark], starts: Sequence[float]) -> None:
    """A green line where each attempt switched over (labelled with its downtime), a red cross where one
    failed (labelled with why). Attempts without samples have no place on the axis and are skipped."""
    low, high = ax.get_xlim()
    for mark in marks:
        if mark.attempt - 1 >= len(starts):
            continue
        base = starts[mark.attempt - 1]
        if mark.switchover_s is not None:
            x = base + mark.switchover_s
            right_half = x > (low + high) / 2  # write the label towards the middle, not off the edge
            ax.axvline(x, color="tab:green", linewidth=1.5)
            ax.annotate(
                mark.label if mark.completed is not False else "switchover",
                xy=(x, 0.5),
                xycoords=("data", "axes fraction"),
                xytext=(-4 if right_half else 4, 0),
                textcoords="offset points",
                ha="right" if right_half else "left",
                rotation=0,
                color="tab:green",
                fontsize=9,
                bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "tab:green", "alpha": 0.9},
            )
        if mark.completed is False and mark.end_s is not None:
            x = base + mark.end_s
            ax.plot([x], [0], marker="X", markersize=10, color="tab:red", clip_on=False)
            ax.annotate(
                mark.label,
                xy=(x, 0.0),
                xycoords=("data", "axes fraction"),
                xytext=(-3, 10),
                textcoords="offset points",
                ha="right",
                color="tab:red",
                fontsize=9,
            )


def _matplotlib() -> tuple[type[Figure], type[FigureCanvasAgg]]:
    """``(Figure, FigureCanvasAgg)``, or one clear error naming the extra to install."""
    try:
        # The package first: a broken or stubbed-out install fails here, not on a cached submodule.
        import matplotlib

        matplotlib.use("Agg")  # headless: never look for a display
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ConfigError(f"--plot needs matplotlib: {INSTALL_HINT}") from e
    return Figure, FigureCanvasAgg
