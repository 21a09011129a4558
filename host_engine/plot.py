"""``host-engine report MIGRATION --plot FILE.png``: remaining bytes and throttle over time, as a PNG.

matplotlib is the optional extra ``plot``; it is imported here only, lazily, and drawn with the Agg canvas
on a ``Figure`` of our own (no pyplot: no global figure state, no display needed). Without it the CLI
prints one line saying what to install.

The input is ``host_engine.executor.timeline``: one row per logged change (phase, round, throttle, disk
limit), attempt by attempt, each with the attempt's ``elapsed_s``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from host_engine.errors import ConfigError, InvalidInput

if TYPE_CHECKING:
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


def plot_timeline(rows: Sequence[Mapping[str, object]], path: str | Path, *, title: str) -> Path:
    """Draw remaining disk and memory bytes (top) and memory throttle % with the disk write limit (bottom)
    over time into the PNG ``path``. Raises ``ConfigError`` without matplotlib, ``InvalidInput`` when there
    is nothing to draw or the file cannot be written."""
    if not rows:
        raise InvalidInput("no progress recorded yet: nothing to plot", field="plot")
    figure_cls, canvas_cls = _matplotlib()
    xs, starts = time_axis_s(rows)
    disk = [(_number(r, "disk_remaining_bytes") or 0.0) for r in rows]
    memory = [(_number(r, "memory_remaining_bytes") or 0.0) for r in rows]
    throttle = [(_number(r, "memory_throttle_pct") or 0.0) for r in rows]
    limit = [_number(r, "disk_write_limit_bps") for r in rows]
    unit, unit_name = (GIB, "GiB") if max(disk + memory) >= 10 * GIB else (MIB, "MiB")

    fig = figure_cls(figsize=FIGURE_SIZE_IN, dpi=FIGURE_DPI)
    canvas_cls(fig)
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.plot(xs, [b / unit for b in disk], marker=".", label="disk remaining")
    top.plot(xs, [b / unit for b in memory], marker=".", label="memory remaining")
    top.set_ylabel(f"remaining ({unit_name})")
    top.set_ylim(bottom=0)
    top.legend(loc="upper right")
    top.set_title(title)

    # Throttle and limit hold from one logged change to the next: steps, not slopes.
    bottom.step(xs, throttle, where="post", color="tab:red", label="memory throttle (%)")
    bottom.set_ylabel("vCPU throttle (%)")
    bottom.set_ylim(0, 100)
    bottom.set_xlabel("seconds since the first attempt started")
    limits = bottom.twinx()
    limits.step(
        xs,
        [math.nan if v is None else v / MIB for v in limit],
        where="post",
        color="tab:purple",
        label="disk write limit (MiB/s)",
    )
    limits.set_ylabel("disk write limit (MiB/s)")
    limits.set_ylim(bottom=0)
    handles = bottom.get_legend_handles_labels()[0] + limits.get_legend_handles_labels()[0]
    bottom.legend(handles=handles, loc="upper right")
    for ax in (top, bottom):
        ax.grid(True, alpha=0.3)
        for start in starts[1:]:  # a retry: where the next attempt began
            ax.axvline(start, color="grey", linestyle="--", linewidth=1)
    fig.tight_layout()

    out = Path(path)
    try:
        fig.savefig(out, format="png")
    except OSError as e:
        raise InvalidInput(f"cannot write the plot to {out}: {e.strerror or e}", field="plot") from e
    return out


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
