"""Recorded migration progress, for people: one-line summaries (``status``, ``migrate --now``) and the rows of
``host-engine report``.

The executor records progress as plain values (``progress_dict``, below) in the migration's
``stats["progress"]`` and in the log's ``progress`` entries; everything here reads those dicts, so the CLI
needs neither a driver nor a live attempt to show where a migration is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import timedelta

from host_engine.controller import eta_s
from host_engine.drivers.base import Phase, Progress
from host_engine.timeparse import format_duration

MIB = 1024 * 1024
#: An ETA past this is shown as ``> 1 day``: a live migration that far from converging is not going to, and a
#: recorded value can be anything (a rate near zero gives 1e13 s, past what ``timedelta`` holds).
ETA_SHOWN_UP_TO_S = 86400.0
ETA_BEYOND = "> 1 day"
ETA_UNKNOWN = "unknown"

#: ``host-engine report``'s columns (``timeline_row`` gives the values in this order).
TIMELINE_HEADERS = (
    "AT",
    "ATTEMPT",
    "ELAPSED",
    "PHASE",
    "ROUND",
    "DONE",
    "REMAINING",
    "RATE",
    "THROTTLE",
    "DISK LIMIT",
    "ETA",
)


def _int(p: Mapping[str, object], key: str) -> int:
    """A count from a recorded dict; 0 when missing or not a finite number (a record is never trusted)."""
    value = _float(p, key)
    return int(value) if value is not None and math.isfinite(value) else 0


def _float(p: Mapping[str, object], key: str) -> float | None:
    value = p.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    try:
        return float(value)
    except OverflowError:  # an int too big for a float
        return math.inf if value > 0 else -math.inf


def eta_text(eta_s: float) -> str:
    """An ETA in seconds for people, whatever the number: ``1m15s``, ``> 1 day``, ``unknown``.

    >>> [eta_text(s) for s in (75, 0.3, 9.4e13, float("inf"), float("nan"), -1)]
    ['1m15s', '0s', '> 1 day', '> 1 day', 'unknown', 'unknown']
    """
    if math.isnan(eta_s) or eta_s < 0:
        return ETA_UNKNOWN
    if eta_s > ETA_SHOWN_UP_TO_S:
        return ETA_BEYOND
    return format_duration(timedelta(seconds=eta_s))


def remaining_bytes(p: Mapping[str, object]) -> int:
    return _int(p, "disk_remaining_bytes") + _int(p, "memory_remaining_bytes")


def percent_done(p: Mapping[str, object]) -> float | None:
    """Share of disk + memory not left to send, 0-100 (it can fall back while a busy guest dirties pages).

    >>> percent_done({"disk_total_bytes": 100, "disk_remaining_bytes": 0,
    ...               "memory_total_bytes": 100, "memory_remaining_bytes": 50})
    75.0
    >>> percent_done({"phase": "done"}) is None
    True
    """
    total = _int(p, "disk_total_bytes") + _int(p, "memory_total_bytes")
    if total <= 0:
        return None
    share = 1.0 - remaining_bytes(p) / total  # int / int is exact enough and never overflows
    return max(0.0, min(100.0, 100.0 * share))


def _phase(p: Mapping[str, object]) -> str:
    """The recorded phase as one printable word (a record is never trusted to hold a clean one)."""
    text = str(p.get("phase", "?"))[:32]
    return "".join(c if c.isprintable() else "?" for c in text)


def _seconds(s: float) -> str:
    return f"{s:.1f}s" if abs(s) < 1e6 else f"{s:.3g}s"


def _mib(n: float) -> str:
    return f"{n / MIB:.0f} MiB"


def format_eta(p: Mapping[str, object]) -> str:
    """``ETA 12s``, or why there is none."""
    phase = p.get("phase")
    if phase in ("switchover", "done"):
        return "switching over" if phase == "switchover" else "done"
    eta = _float(p, "eta_s")
    if eta is None:
        return "no ETA (not converging yet)"
    return f"ETA {eta_text(eta)}"


def summary(p: Mapping[str, object]) -> str:
    """One line: phase, round, percent, what is left, rate, throttles, ETA.

    >>> summary({"phase": "memory", "round": 3, "disk_total_bytes": 1 << 30, "disk_remaining_bytes": 0,
    ...          "memory_total_bytes": 1 << 30, "memory_remaining_bytes": 1 << 28,
    ...          "transfer_rate_bps": 1 << 30, "memory_throttle_pct": 20, "eta_s": 0.3})
    'memory, round 3, 88 %, 256 MiB left at 1024 MiB/s, throttle 20 %, ETA 0s'
    """
    parts = [_phase(p), f"round {_int(p, 'round')}"]
    pct = percent_done(p)
    if pct is not None:
        parts.append(f"{pct:.0f} %")
    parts.append(f"{_mib(remaining_bytes(p))} left at {_mib(_float(p, 'transfer_rate_bps') or 0)}/s")
    if _int(p, "memory_throttle_pct"):
        parts.append(f"throttle {_int(p, 'memory_throttle_pct')} %")
    limit = _float(p, "disk_write_limit_bps")
    if limit is not None:
        parts.append(f"disk limit {_mib(limit)}/s")
    downtime = _float(p, "downtime_ms")
    if downtime is not None:
        parts.append(f"downtime {downtime:.0f} ms")
    else:
        parts.append(format_eta(p))
    return ", ".join(parts)


def short(p: Mapping[str, object]) -> str:
    """What ``host-engine status`` shows in its PROGRESS column: ``memory 88 % ETA 5s``."""
    pct = percent_done(p)
    pct_text = f" {pct:.0f} %" if pct is not None else ""
    return f"{_phase(p)}{pct_text} {format_eta(p)}"


def timeline_row(row: Mapping[str, object]) -> Sequence[object]:
    """One ``host_engine.timeline.timeline`` row as the values of ``TIMELINE_HEADERS``."""
    pct = percent_done(row)
    limit = _float(row, "disk_write_limit_bps")
    eta = _float(row, "eta_s")
    elapsed = _float(row, "elapsed_s")
    at = row.get("at")
    return (
        at[11:19] if isinstance(at, str) and len(at) >= 19 else at,  # HH:MM:SS of an ISO 8601 time
        row.get("attempt"),
        None if elapsed is None else _seconds(elapsed),
        _phase(row) if "phase" in row else None,
        row.get("round"),
        None if pct is None else f"{pct:.0f} %",
        _mib(remaining_bytes(row)),
        f"{_mib(_float(row, 'transfer_rate_bps') or 0)}/s",
        f"{_int(row, 'memory_throttle_pct')} %",
        None if limit is None else f"{_mib(limit)}/s",
        None if eta is None else eta_text(eta),
    )


#: ``host-engine status --watch``'s progress columns (``live_row`` gives the values in this order).
LIVE_HEADERS = ("PHASE", "ROUND", "DONE", "REMAINING", "RATE", "THROTTLE", "ETA")


def live_row(p: Mapping[str, object]) -> Sequence[object]:
    """A running migration's recorded progress as the values of ``LIVE_HEADERS``.

    >>> live_row({"phase": "memory", "round": 3, "disk_total_bytes": 1 << 30, "disk_remaining_bytes": 0,
    ...           "memory_total_bytes": 1 << 30, "memory_remaining_bytes": 1 << 28,
    ...           "transfer_rate_bps": 1 << 30, "memory_throttle_pct": 20,
    ...           "disk_write_limit_bps": 1 << 25, "eta_s": 75})
    ('memory', 3, '88 %', '256 MiB', '1024 MiB/s', '20 %, disk 32 MiB/s', '1m15s')
    """
    pct = percent_done(p)
    throttle = f"{_int(p, 'memory_throttle_pct')} %"
    limit = _float(p, "disk_write_limit_bps")
    if limit is not None:
        throttle += f", disk {_mib(limit)}/s"
    eta = format_eta(p)
    return (
        _phase(p),
        _int(p, "round"),
        None if pct is None else f"{pct:.0f} %",
        _mib(remaining_bytes(p)),
        f"{_mib(_float(p, 'transfer_rate_bps') or 0)}/s",
        throttle,
        eta.removeprefix("ETA ").replace("no ETA (not converging yet)", "not converging"),
    )


def progress_dict(p: Progress) -> dict[str, object]:
    """A Progress as plain JSON values (stats, log data, ``--json``)."""
    return {
        "phase": p.phase.value,
        "elapsed_s": round(p.elapsed_s, 2),
        "round": p.round,
        "disk_total_bytes": p.disk_total_bytes,
        "disk_remaining_bytes": p.disk_remaining_bytes,
        "memory_total_bytes": p.memory_total_bytes,
        "memory_remaining_bytes": p.memory_remaining_bytes,
        "disk_dirty_rate_bps": round(p.disk_dirty_rate_bps),
        "memory_dirty_rate_bps": round(p.memory_dirty_rate_bps),
        "transfer_rate_bps": round(p.transfer_rate_bps),
        "disk_write_limit_bps": p.disk_write_limit_bps,
        "memory_throttle_pct": p.memory_throttle_pct,
        "downtime_ms": p.downtime_ms,
        "bytes_transferred": p.bytes_transferred,
        "eta_s": None if (eta := eta_s(p)) is None else round(eta, 1),
    }


def describe(p: Progress) -> str:
    """One line a person can follow."""
    left_mib = (p.disk_remaining_bytes + p.memory_remaining_bytes) / (1024 * 1024)
    parts = [
        f"{p.phase.value}",
        f"round {p.round}",
        f"{left_mib:.0f} MiB left",
        f"{p.transfer_rate_bps / (1024 * 1024):.0f} MiB/s",
    ]
    if p.memory_throttle_pct:
        parts.append(f"throttle {p.memory_throttle_pct} %")
    if p.disk_write_limit_bps is not None:
        parts.append(f"disk limit {p.disk_write_limit_bps / (1024 * 1024):.0f} MiB/s")
    if p.downtime_ms is not None:
        parts.append(f"downtime {p.downtime_ms:.0f} ms")
    elif p.phase in (Phase.DISK, Phase.MEMORY):
        eta = eta_s(p)
        parts.append("not converging yet" if eta is None else f"ETA {eta:.0f} s")
    return ", ".join(parts)
