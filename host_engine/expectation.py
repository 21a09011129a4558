"""A migration's predicted duration, downtime and bytes, kept in its ``stats`` under one typed accessor.

``host-engine evacuate --predict`` simulates every planned move as the executor will run them
(``evacuation_forecast.store_predictions``) and stores the result here; the guest is told it with its
notice (``expected_downtime_ms`` / ``expected_duration_s`` in the metadata server's event), and
``host-engine report`` shows it next to what the migration really took.
Nothing else reads or writes ``PREDICTED_KEY``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from host_engine.models import Migration
from host_engine.states import MigrationState

PREDICTED_KEY = "predicted"
# Where the executor keeps the last attempt's summary (``executor.LAST_ATTEMPT_KEY``; the executor imports
# modules that import this one, so the name is repeated, as ``cli/sim.py`` does).
LAST_ATTEMPT_KEY = "last_attempt"
# The metadata server's bounds (metadata_server/validate.py): a prediction beyond them is not sent.
MAX_DOWNTIME_MS = 3_600_000.0
MAX_DURATION_S = 7 * 24 * 3600.0


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    out = float(value)
    return out if math.isfinite(out) and out >= 0 else None


@dataclass(frozen=True)
class Expected:
    """What the simulator predicted for one migration (``downtime_ms`` None: predicted not to converge)."""

    duration_s: float
    downtime_ms: float | None
    bytes_transferred: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "duration_s": round(self.duration_s, 1),
            "downtime_ms": None if self.downtime_ms is None else round(self.downtime_ms, 1),
            "bytes_transferred": self.bytes_transferred,
        }

    @classmethod
    def from_json(cls, doc: object) -> Expected | None:
        """The prediction in ``doc``; None when absent or unusable (an older row, a hand edit)."""
        if not isinstance(doc, Mapping):
            return None
        duration = _number(doc.get("duration_s"))
        if duration is None:
            return None
        size = _number(doc.get("bytes_transferred"))
        return cls(duration, _number(doc.get("downtime_ms")), None if size is None else int(size))

    def for_guest(self) -> dict[str, float]:
        """The optional fields of the metadata server's event PUT (only those within its bounds)."""
        out: dict[str, float] = {}
        if self.downtime_ms is not None and self.downtime_ms <= MAX_DOWNTIME_MS:
            out["expected_downtime_ms"] = round(self.downtime_ms, 1)
        if self.duration_s <= MAX_DURATION_S:
            out["expected_duration_s"] = round(self.duration_s, 1)
        return out

    def describe(self) -> str:
        down = "no switchover (not converging)" if self.downtime_ms is None else f"{self.downtime_ms:.0f} ms"
        return f"predicted {self.duration_s:.1f} s / {down} downtime"


def predicted(stats: Mapping[str, Any]) -> Expected | None:
    """The prediction stored with a migration, if any."""
    return Expected.from_json(stats.get(PREDICTED_KEY))


def with_prediction(stats: Mapping[str, Any], expected: Expected) -> dict[str, Any]:
    """``stats`` with the prediction set."""
    return {**stats, PREDICTED_KEY: expected.to_json()}


@dataclass(frozen=True)
class Actual:
    """What a completed migration's last attempt really took."""

    duration_s: float | None
    downtime_ms: float | None
    bytes_transferred: int | None

    def to_json(self) -> dict[str, Any]:
        return {
            "duration_s": self.duration_s,
            "downtime_ms": self.downtime_ms,
            "bytes_transferred": self.bytes_transferred,
        }


def actual(m: Migration) -> Actual | None:
    """The real numbers of a completed migration (None until it completed)."""
    last = m.stats.get(LAST_ATTEMPT_KEY)
    if m.state is not MigrationState.COMPLETED or not isinstance(last, Mapping):
        return None
    size = _number(last.get("bytes_transferred"))
    return Actual(
        _number(last.get("duration_s")),
        _number(last.get("downtime_ms")),
        None if size is None else int(size),
    )


def compare_line(m: Migration) -> str | None:
    """``predicted 42.0 s / 180 ms downtime, actual 40.3 s / 210 ms`` (None without a prediction)."""
    p = predicted(m.stats)
    if p is None:
        return None
    a = actual(m)
    if a is None:
        return f"{p.describe()}, actual: not completed yet"
    secs = "-" if a.duration_s is None else f"{a.duration_s:.1f}"
    down = "-" if a.downtime_ms is None else f"{a.downtime_ms:.0f}"
    return f"{p.describe()}, actual {secs} s / {down} ms"
