"""The demo's final table: per moved droplet, its notice lead, downtime, throttle, bytes moved, result, new
host, and the simulator's prediction against what happened."""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from host_engine.drivers.sim import GiB
from host_engine.executor import LAST_ATTEMPT_KEY
from host_engine.lab.demo.scenario import DemoOptions
from host_engine.prediction import Prediction
from host_engine.states import LogKind, MigrationState
from host_engine.store import Store

# The states an attempt starts copying in: the notice lead ends there.
_STARTED = (MigrationState.RUNNING, MigrationState.OFFLINE_RUNNING)


class Method(enum.StrEnum):
    """How a droplet moved: copied while running, or powered off, copied and powered on again."""

    LIVE = "live"
    OFFLINE = "offline"


@dataclass
class Row:
    """The final table, one per droplet."""

    droplet: str
    workload: str
    size: str
    lead_s: float | None
    downtime_ms: float | None
    method: Method
    throttle: str
    bytes_moved: int
    result: str
    new_host: str
    duration_s: float | None = None
    predicted: Prediction | None = None
    attempts: int = 1

    @property
    def offline(self) -> bool:
        return self.method is Method.OFFLINE


@dataclass(frozen=True)
class PowerTimes:
    """Wall times (unix) at which prefer-offline droplets went off and came on again."""

    off: Mapping[str, float]
    on: Mapping[str, float]


def rows(
    store: Store,
    options: DemoOptions,
    migrations: Mapping[str, str],
    power: PowerTimes,
    predictions: Mapping[str, Prediction],
) -> list[Row]:
    out = []
    for did, mid in migrations.items():
        m = store.get_migration(mid)
        log_entries = store.migration_log(mid)
        starts = [e.at for e in log_entries if e.kind == LogKind.TRANSITION and e.to_state in _STARTED]
        lead = (starts[0] - m.notified_at).total_seconds() if starts and m.notified_at else None
        last = m.stats.get(LAST_ATTEMPT_KEY) or {}
        max_throttle = max(
            (int(e.data.get("memory_throttle_pct") or 0) for e in log_entries if e.kind == LogKind.PROGRESS),
            default=0,
        )
        limit_s = float(last.get("disk_limit_s") or 0.0)
        parts = []
        if max_throttle:
            parts.append(f"cpu up to {max_throttle} %")
        if limit_s:
            parts.append(f"disk limit {limit_s:.1f} s")
        attempts = f"{m.attempt} attempts" if m.attempt > 1 else "1 attempt"
        method = Method.OFFLINE if last.get("offline") else Method.LIVE
        spec = options.spec(did)
        downtime_ms = last.get("downtime_ms")
        if method is Method.OFFLINE and did in power.off and did in power.on:
            downtime_ms = (power.on[did] - power.off[did]) * 1000  # off, copied, on again
        out.append(
            Row(
                droplet=did,
                workload=spec.kind,
                size=spec.size,
                lead_s=lead,
                downtime_ms=downtime_ms,
                method=method,
                throttle=", ".join(parts) or "-",
                bytes_moved=int(last.get("bytes_transferred") or 0),
                result=f"{m.state.value} ({method}, {attempts})",
                new_host=store.get_droplet(did).host,
                duration_s=None if last.get("duration_s") is None else float(last["duration_s"]),
                predicted=predictions.get(did),
                attempts=m.attempt,
            )
        )
    return out


def print_table(echo: Callable[[str], None], table: list[Row], *, sim_s: float, wall_s: float) -> None:
    headers = ["DROPLET", "WORKLOAD", "SIZE", "NOTICE LEAD", "DOWNTIME", "THROTTLE", "MOVED", "RESULT",
               "NEW HOST", "PREDICTED vs ACTUAL"]  # fmt: skip
    cells = [
        [
            r.droplet,
            r.workload,
            r.size,
            "-" if r.lead_s is None else f"{r.lead_s:.1f} s",
            _downtime(r),
            r.throttle,
            f"{r.bytes_moved / GiB:.1f} GiB",
            r.result,
            r.new_host,
            _versus(r),
        ]
        for r in table
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    echo("")
    echo("  " + "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for c in cells:
        echo("  " + "  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)).rstrip())
    echo("")
    echo(
        "  notice lead: from the notice to the start of the copy; downtime: the pause at switchover "
        "(offline: power-off to power-on)"
    )
    echo(
        "  predicted vs actual: the forecast printed with the plan, in simulated seconds (the last attempt);"
    )
    echo(
        "  windows and retries follow the wall clock, so a start a wall second late (a slow notice, a retry) "
        "is 20 simulated seconds late and changes who shares hv-1's NIC"
    )
    echo(f"  the simulated hypervisors ran {sim_s:.0f} s of migration time in {wall_s:.0f} s")


def _versus(r: Row) -> str:
    """The sim's prediction at planning against what happened: duration, downtime (of the last attempt).

    The forecast is of one live attempt per droplet, started as the limits allow: a droplet whose guest chose
    an offline move, or whose first attempt failed, ran otherwise than predicted (and freed its slot at
    another moment, so the moves after it shared the NIC otherwise too); the column says so."""
    p = r.predicted
    if p is None:
        return "-"
    actual_s = "-" if r.duration_s is None else f"{r.duration_s:.1f}"
    if r.offline:
        return f"{p.duration_s:.1f} s live vs {actual_s} s offline"
    down = "-" if p.downtime_ms is None else f"{p.downtime_ms:.0f}"
    actual_down = "-" if r.downtime_ms is None else f"{r.downtime_ms:.0f}"
    retried = f" (attempt {r.attempts})" if r.attempts > 1 else ""
    return f"{p.duration_s:.1f} vs {actual_s} s, {down} vs {actual_down} ms{retried}"


def _downtime(r: Row) -> str:
    if r.downtime_ms is None:
        return "-"
    if r.offline:
        return f"{r.downtime_ms / 1000:.1f} s off"
    return f"{r.downtime_ms:.0f} ms"
