"""The journal file's schema, checked strictly before the agent trusts a byte of it.

The journal is written only by the agent, but it lives on a disk a person (or a bug, or a full disk) can
change. A document of the wrong shape must never crash the agent at start — a crash loop under
``Restart=always`` — nor fail later on every step (a ``deadline`` that is a string). So
:func:`check_journal` checks every field of every record, without recursion over untrusted nesting, and
raises :class:`JournalFormatError` naming the first field at fault; the journal then moves the file aside like
one that is not JSON at all.

Version 1::

    {"version": 1, "active": null | "<event id>",
     "events": {"<event id>": {"server_id": str|null, "kind": "live_migrate"|"offline_migrate",
                               "status": "<EventStatus>", "first_seen": number, "deadline": number|null,
                               "not_before": number|null, "simulated": bool,
                               "history": [["<EventStatus>", number], ...],
                               "hooks": {"<phase>/<name>": {"runs": int, "started_at": number|null,
                                                            "finished_at": number|null,
                                                            "outcome": "<HookOutcome>"|null, "detail": str,
                                                            "timeout_s": number|null (optional),
                                                            "process": {"pgid": int, "boot_id": str,
                                                                        "start_ticks": int|null}|null
                                                                       (optional)}},
                               "data": {"shutdown_abandoned": bool,
                                        "nested_vms:<uri>": {"running": [str, ...]}}}}}
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from guest_agent.config import Phase
from guest_agent.states import EventStatus, HookOutcome, MigrationKind

JOURNAL_VERSION = 1
MAX_JOURNAL_BYTES = 4 * 1024 * 1024  # 50 kept events take a few hundred KiB; more is not ours
MAX_EVENTS = 1000
MAX_HOOKS_PER_EVENT = 1000
MAX_HISTORY = 1000
MAX_DETAIL_CHARS = 1000
MAX_ID_CHARS = 200
MAX_NESTED_VMS = 10_000

EVENT_KINDS = frozenset(k.value for k in MigrationKind)
HOOK_OUTCOMES = frozenset(o.value for o in HookOutcome)
SHUTDOWN_ABANDONED = "shutdown_abandoned"
NESTED_VMS_PREFIX = "nested_vms:"

_HOOK_NAME_RE = re.compile(r"@?[A-Za-z0-9._-]{1,64}")
_EVENT_KEYS = frozenset(
    {
        "server_id",
        "kind",
        "status",
        "first_seen",
        "deadline",
        "not_before",
        "simulated",
        "history",
        "hooks",
        "data",
    }
)
_HOOK_KEYS = frozenset({"runs", "started_at", "finished_at", "outcome", "detail"})
_HOOK_OPTIONAL_KEYS = frozenset({"timeout_s", "process"})
_PROCESS_KEYS = frozenset({"pgid", "boot_id", "start_ticks"})


class JournalFormatError(ValueError):
    """The document is not a version-1 journal; the message names the field at fault."""


def check_journal(doc: object) -> dict[str, Any]:
    """Return ``doc`` if it is a valid version-1 journal, else raise :class:`JournalFormatError`."""
    top = _mapping(doc, "the journal")
    _keys(top, frozenset({"version", "active", "events"}), frozenset(), "the journal")
    version = top["version"]
    if isinstance(version, bool) or version != JOURNAL_VERSION:
        raise JournalFormatError(f"version: unknown journal version {_show(version)}")
    events = _mapping(top["events"], "events")
    if len(events) > MAX_EVENTS:
        raise JournalFormatError(f"events: {len(events)} events, more than the {MAX_EVENTS} an agent keeps")
    for event_id, raw in events.items():
        _check_event(event_id, raw)
    active = top["active"]
    if active is not None:
        if not isinstance(active, str) or active not in events:
            raise JournalFormatError(f"active: {_show(active)} is not an event in the journal")
        if EventStatus(events[active]["status"]).terminal:
            raise JournalFormatError(f"active: event {active} is already {events[active]['status']}")
    return top


def _check_event(event_id: str, raw: object) -> None:
    where = f"events[{_show(event_id)}]"
    _string(event_id, where, max_chars=MAX_ID_CHARS)
    ev = _mapping(raw, where)
    _keys(ev, _EVENT_KEYS, frozenset(), where)
    if ev["server_id"] is not None:
        _string(ev["server_id"], f"{where}.server_id", max_chars=MAX_ID_CHARS)
    if not isinstance(ev["kind"], str) or ev["kind"] not in EVENT_KINDS:
        raise JournalFormatError(
            f"{where}.kind: must be {' or '.join(sorted(EVENT_KINDS))}, got {_show(ev['kind'])}"
        )
    _status(ev["status"], f"{where}.status")
    _number(ev["first_seen"], f"{where}.first_seen")
    for key in ("deadline", "not_before"):
        if ev[key] is not None:
            _number(ev[key], f"{where}.{key}")
    if not isinstance(ev["simulated"], bool):
        raise JournalFormatError(f"{where}.simulated: must be true or false, got {_show(ev['simulated'])}")
    history = ev["history"]
    if not isinstance(history, list) or len(history) > MAX_HISTORY:
        raise JournalFormatError(f"{where}.history: must be a list of at most {MAX_HISTORY} entries")
    for i, item in enumerate(history):
        if not isinstance(item, list) or len(item) != 2:
            raise JournalFormatError(f"{where}.history[{i}]: must be [status, time]")
        _status(item[0], f"{where}.history[{i}][0]")
        _number(item[1], f"{where}.history[{i}][1]")
    hooks = _mapping(ev["hooks"], f"{where}.hooks")
    if len(hooks) > MAX_HOOKS_PER_EVENT:
        raise JournalFormatError(f"{where}.hooks: more than {MAX_HOOKS_PER_EVENT} hooks")
    for key, rec in hooks.items():
        _check_hook(key, rec, f"{where}.hooks[{_show(key)}]")
    _check_data(_mapping(ev["data"], f"{where}.data"), f"{where}.data")


def _check_hook(key: str, raw: object, where: str) -> None:
    phase, sep, name = key.partition("/")
    if not sep or phase not in {p.value for p in Phase} or not _HOOK_NAME_RE.fullmatch(name):
        raise JournalFormatError(f"{where}: not a <phase>/<hook name> key")
    rec = _mapping(raw, where)
    _keys(rec, _HOOK_KEYS, _HOOK_OPTIONAL_KEYS, where)
    runs = rec["runs"]
    if isinstance(runs, bool) or not isinstance(runs, int) or not 0 <= runs <= 1_000_000:
        raise JournalFormatError(f"{where}.runs: must be a count, got {_show(runs)}")
    for field in ("started_at", "finished_at", "timeout_s"):
        if rec.get(field) is not None:
            _number(rec[field], f"{where}.{field}")
    outcome = rec["outcome"]
    if outcome is not None and (not isinstance(outcome, str) or outcome not in HOOK_OUTCOMES):
        raise JournalFormatError(f"{where}.outcome: unknown outcome {_show(rec['outcome'])}")
    _string(rec["detail"], f"{where}.detail", max_chars=MAX_DETAIL_CHARS, allow_empty=True)
    process = rec.get("process")
    if process is not None:
        proc = _mapping(process, f"{where}.process")
        _keys(proc, _PROCESS_KEYS, frozenset(), f"{where}.process")
        pgid = proc["pgid"]
        if isinstance(pgid, bool) or not isinstance(pgid, int) or not 1 < pgid < 2**31:
            raise JournalFormatError(f"{where}.process.pgid: must be a process group id, got {_show(pgid)}")
        _string(proc["boot_id"], f"{where}.process.boot_id", max_chars=64, allow_empty=True)
        ticks = proc["start_ticks"]
        if ticks is not None and (isinstance(ticks, bool) or not isinstance(ticks, int) or ticks < 0):
            raise JournalFormatError(
                f"{where}.process.start_ticks: must be a count or null, got {_show(ticks)}"
            )


def _check_data(data: Mapping[str, Any], where: str) -> None:
    for key, value in data.items():
        here = f"{where}[{_show(key)}]"
        if key == SHUTDOWN_ABANDONED:
            if not isinstance(value, bool):
                raise JournalFormatError(f"{here}: must be true or false")
        elif key.startswith(NESTED_VMS_PREFIX) and len(key) <= 1000:
            record = _mapping(value, here)
            _keys(record, frozenset({"running"}), frozenset(), here)
            running = record["running"]
            if (
                not isinstance(running, list)
                or len(running) > MAX_NESTED_VMS
                or not all(isinstance(n, str) and 0 < len(n) <= 256 for n in running)
            ):
                raise JournalFormatError(f"{here}.running: must be a list of domain names")
        else:
            raise JournalFormatError(f"{here}: unknown key")


# ---- small checks


def _mapping(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise JournalFormatError(f"{where}: must be an object, got {_kind(value)}")
    return value


def _keys(value: Mapping[str, Any], required: frozenset[str], optional: frozenset[str], where: str) -> None:
    missing = sorted(required - value.keys())
    if missing:
        raise JournalFormatError(f"{where}: missing {missing[0]!r}")
    unknown = sorted(k for k in value if k not in required and k not in optional)
    if unknown:
        raise JournalFormatError(f"{where}: unknown key {_show(unknown[0])}")


def _number(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise JournalFormatError(f"{where}: must be a number, got {_show(value)}")
    if not -1e12 < value < 1e12:  # seconds since the epoch, or a timeout: not beyond year 33658
        raise JournalFormatError(f"{where}: out of range, got {_show(value)}")
    return float(value)


def _string(value: object, where: str, *, max_chars: int, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or len(value) > max_chars or (not value and not allow_empty):
        raise JournalFormatError(f"{where}: must be a string of 1-{max_chars} characters, got {_show(value)}")
    return value


def _status(value: object, where: str) -> EventStatus:
    try:
        if not isinstance(value, str):
            raise ValueError(value)
        return EventStatus(value)
    except ValueError as e:
        raise JournalFormatError(f"{where}: unknown status {_show(value)}") from e


def _kind(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), "null" if value is None else "a number" if isinstance(value, int | float) else "?"
    )


def _show(value: object) -> str:
    """A short, safe rendering of a hostile value for a log line."""
    text = repr(value) if isinstance(value, str | int | float | bool) or value is None else _kind(value)
    return text if len(text) <= 60 else text[:57] + "..."
