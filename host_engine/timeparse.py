"""Wall-clock time: the injectable clock, and parsing/formatting the times a user types.

Times in the store and on the wire are timezone-aware UTC. The engine never reads the wall clock directly:
it is handed a :data:`Clock` at its entry point, so tests can drive it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from host_engine.errors import InvalidInput

Clock = Callable[[], datetime]

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)", re.ASCII)
# Ten years: no notice, lease or interval is longer; past ~1e9 days a timedelta overflows.
MAX_DURATION_S = 10 * 365 * 86400.0
_DURATION_UNITS_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


#: How much of a bad value an error message repeats (a pasted novel is not echoed back whole).
SHOWN_CHARS = 40


def _shown(text: str) -> str:
    return repr(text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "...")


def utc_now() -> datetime:
    """The real clock: now, aware, in UTC."""
    return datetime.now(UTC)


def parse_duration(text: str, *, field: str = "duration") -> timedelta:
    """``"10m"``, ``"90s"``, ``"1h30m"``, ``"2d"``, ``"250ms"`` → a timedelta. A bare number means seconds."""
    raw = text.strip().lower().replace(" ", "")
    if not raw:
        raise InvalidInput(f"{field}: empty duration (e.g. 10m, 90s, 1h30m)", field=field)
    if re.fullmatch(r"\d+(?:\.\d+)?", raw, re.ASCII):
        return _bounded(float(raw), text, field)
    pos = 0
    total_s = 0.0
    for m in _DURATION_PART.finditer(raw):
        if m.start() != pos:
            break
        total_s += float(m.group(1)) * _DURATION_UNITS_S[m.group(2)]
        pos = m.end()
    if pos != len(raw) or pos == 0:
        raise InvalidInput(f"{field}: malformed duration {_shown(text)} (e.g. 10m, 90s, 1h30m)", field=field)
    return _bounded(total_s, text, field)


def _bounded(seconds: float, text: str, field: str) -> timedelta:
    if not seconds <= MAX_DURATION_S:
        raise InvalidInput(f"{field}: duration {_shown(text)} is longer than ten years", field=field)
    return timedelta(seconds=seconds)


def format_duration(delta: timedelta) -> str:
    """A short human form: ``1h05m``, ``9m30s``, ``-2m``, ``0s``."""
    total = round(delta.total_seconds())
    sign = "-" if total < 0 else ""
    total = abs(total)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{sign}{days}d{hours:02d}h"
    if hours:
        return f"{sign}{hours}h{minutes:02d}m"
    if minutes:
        return f"{sign}{minutes}m{seconds:02d}s" if seconds else f"{sign}{minutes}m"
    return f"{sign}{seconds}s"


def parse_time(text: str, *, now: datetime, field: str = "time") -> datetime:
    """An absolute RFC 3339 / ISO 8601 time with a zone (``2026-12-01T02:00Z``), ``now``, or ``+DURATION``.

    A time without a zone is refused: on a fleet spread over zones "02:00" is ambiguous.
    """
    raw = text.strip()
    if raw.lower() == "now":
        return now
    if raw.startswith("+"):
        return now + parse_duration(raw[1:], field=field)
    iso = raw[:-1] + "+00:00" if raw[-1:] in ("Z", "z") else raw
    try:
        value = datetime.fromisoformat(iso)
    except ValueError as e:
        raise InvalidInput(
            f"{field}: malformed time {_shown(text)} (expected e.g. 2026-12-01T02:00Z, now, +30m)",
            field=field,
        ) from e
    if value.tzinfo is None:
        raise InvalidInput(f"{field}: time {_shown(text)} has no timezone (add Z for UTC)", field=field)
    return value.astimezone(UTC)


def format_time(value: datetime | None) -> str | None:
    """RFC 3339 in UTC with a ``Z`` and whole seconds, or None."""
    if value is None:
        return None
    return value.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
