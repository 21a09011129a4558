"""Per-migration settings an operator gives, kept in the migration's ``stats`` JSON under typed accessors.

Two of them, each in one place here (no bare string keys elsewhere):

- ``ForceComplete`` — ``host-engine force-complete MIGRATION --reason TEXT`` (Nova's ``force-complete``): the
  worker supervising the attempt switches over now, whatever the controller's downtime budget, and the attempt
  completes with its real (longer) downtime recorded. The request names its attempt, so a retry after an
  attempt that failed anyway is not forced by an old request.
- the bandwidth cap — ``migrate``/``evacuate --bandwidth 200MiB/s`` (Proxmox's per-migration ``--bwlimit``):
  whole MiB/s, as libvirt takes it; the executor passes it to the driver as
  ``MigrationSpec.options["bandwidth_mibps"]`` and the planner sizes the migration's slot with it.

``request_force_complete`` is the store side of the CLI command, like ``executor.request_abort``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from host_engine.config import MAX_BANDWIDTH_MIBPS
from host_engine.errors import Conflict, InvalidInput
from host_engine.models import Migration
from host_engine.states import LogKind, MigrationState
from host_engine.store import Store
from host_engine.units import parse_size

# Keys in ``migrations.stats``.
FORCE_COMPLETE_KEY = "force_complete"
BANDWIDTH_KEY = "bandwidth_mibps"
# The driver option the libvirt and sim drivers read as the migration's bandwidth cap.
BANDWIDTH_OPTION = "bandwidth_mibps"

MiB = 1024 * 1024
# A reason is one line in the log and in ``report``: long enough for a ticket reference and a sentence.
MAX_REASON_CHARS = 500
_PER_SECOND = re.compile(r"\s*/\s*s(ec)?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class ForceComplete:
    """An operator's request to switch attempt ``attempt`` over now, accepting more downtime."""

    by: str
    reason: str
    at: datetime
    attempt: int

    def to_json(self) -> dict[str, Any]:
        return {"by": self.by, "reason": self.reason, "at": self.at.isoformat(), "attempt": self.attempt}

    @classmethod
    def from_json(cls, doc: object) -> ForceComplete | None:
        """The request stored in ``doc``; None when absent or not a request (an older row, a hand edit)."""
        if not isinstance(doc, Mapping):
            return None
        try:
            return cls(
                str(doc["by"]),
                str(doc["reason"]),
                datetime.fromisoformat(str(doc["at"])),
                int(doc["attempt"]),
            )
        except (KeyError, TypeError, ValueError):
            return None

    def describe(self) -> str:
        return f"force-complete requested by {self.by}: {self.reason}"


def force_complete(stats: Mapping[str, Any]) -> ForceComplete | None:
    """The force-complete request recorded in a migration's stats, if any (of any attempt)."""
    return ForceComplete.from_json(stats.get(FORCE_COMPLETE_KEY))


def forced_now(m: Migration) -> ForceComplete | None:
    """The request that applies to ``m``'s current attempt, if any."""
    req = force_complete(m.stats)
    return req if req is not None and req.attempt == m.attempt else None


def bandwidth_mibps(stats: Mapping[str, Any]) -> int | None:
    """The migration's own bandwidth cap in MiB/s, or None (the engine's configured default applies)."""
    value = stats.get(BANDWIDTH_KEY)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def with_bandwidth(stats: Mapping[str, Any], mibps: int | None) -> dict[str, Any]:
    """``stats`` with the bandwidth cap set (None: left out)."""
    out = dict(stats)
    if mibps is not None:
        out[BANDWIDTH_KEY] = mibps
    return out


def bandwidth_options(stats: Mapping[str, Any]) -> dict[str, str]:
    """The driver options that carry the migration's bandwidth cap (none when it has no cap of its own)."""
    mibps = bandwidth_mibps(stats)
    return {BANDWIDTH_OPTION: str(mibps)} if mibps is not None else {}


def parse_bandwidth(text: str, *, field: str = "--bandwidth") -> int:
    """``200MiB/s``, ``1GiB/s``, ``500MB/s`` (the ``/s`` may be left out) -> whole MiB/s, rounded down.

    libvirt takes whole MiB/s. Below 1 MiB/s, above the engine's maximum, without a unit, negative or
    malformed: :class:`InvalidInput`, one line.

    >>> parse_bandwidth("200MiB/s"), parse_bandwidth("1GiB/s"), parse_bandwidth("500MB/s")
    (200, 1024, 476)
    """
    stripped = _PER_SECOND.sub("", text)
    # ASCII only: parse_size's regex also reads other scripts' digits (full-width ones, say) as numbers.
    if not stripped.strip() or not stripped.isascii():
        raise InvalidInput(f"{field}: malformed bandwidth {text!r} (e.g. 200MiB/s, 1GiB/s)", field=field)
    size = parse_size(stripped, field=field)
    mibps = size // MiB
    if mibps < 1:
        raise InvalidInput(f"{field}: {text!r} is under the 1MiB/s minimum", field=field)
    if mibps > MAX_BANDWIDTH_MIBPS:
        raise InvalidInput(f"{field}: {text!r} is over the {MAX_BANDWIDTH_MIBPS}MiB/s maximum", field=field)
    return mibps


def request_force_complete(store: Store, migration_id: str, *, by: str, reason: str) -> Migration:
    """``host-engine force-complete MIGRATION``: record who, why and when in the migration's stats and log;
    the worker supervising the running attempt picks it up within a few seconds and switches over now.

    Only a live attempt that is running can be forced: anything else (not started, ended, an offline copy,
    an abort already asked for) is a :class:`Conflict`.
    """
    reason = " ".join(reason.split())
    if not reason:
        raise InvalidInput("--reason must say why (it is logged and shown in report)", field="reason")
    if not reason.isprintable():
        raise InvalidInput("--reason must be printable text (no control characters)", field="reason")
    if len(reason) > MAX_REASON_CHARS:
        raise InvalidInput(f"--reason is longer than {MAX_REASON_CHARS} characters", field="reason")
    from host_engine.executor import ABORT_REQUEST_KEY  # the executor imports this module

    with store.begin() as tx:
        m = tx.get_migration(migration_id, for_update=True)
        if m.state is MigrationState.OFFLINE_RUNNING:
            raise Conflict(f"migration {migration_id} is an offline copy: there is no switchover to force")
        if m.state is not MigrationState.RUNNING:
            raise Conflict(f"migration {migration_id} is {m.state.value}: nothing running to force-complete")
        if m.stats.get(ABORT_REQUEST_KEY):
            raise Conflict(f"migration {migration_id} is being aborted: nothing to force-complete")
        req = ForceComplete(by, reason, tx.now, m.attempt)
        return tx.update_migration(
            migration_id,
            stats={**m.stats, FORCE_COMPLETE_KEY: req.to_json()},
            message=f"{req.describe()} (attempt {m.attempt})",
            log_kind=LogKind.FORCE_COMPLETE,
        )
