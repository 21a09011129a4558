"""The crash-safe journal: what the agent knows about each event, and each hook's start and end.

One small JSON document, rewritten whole on every change: written to a temporary file in the same
directory, fsync'ed, renamed over the old one, and the directory fsync'ed. A crash at any moment leaves
either the old or the new document, never a torn one, so after ``kill -9`` the agent knows exactly which
hooks finished (never run again), which were interrupted (started, no end: re-run only if idempotent),
and which phase it was in.

A hook's record is keyed ``phase/name`` inside its event. Hooks may also keep a little data with the
event (``nested_vms`` records the domains that were running at notice).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guest_agent.config import Phase
from guest_agent.errors import AlreadyRunning, JournalError
from guest_agent.journal_schema import JOURNAL_VERSION, MAX_JOURNAL_BYTES, check_journal
from guest_agent.procgroups import ProcessIdentity
from guest_agent.states import EventStatus, HookOutcome, MigrationKind, check_transition

__all__ = [
    "EventRecord",
    "HookOutcome",  # defined in guest_agent.states, with the other lifecycle enums
    "HookRecord",
    "Journal",
    "atomic_write",
    "locked",
]

log = logging.getLogger(__name__)

KEEP_FINISHED_EVENTS = 50


@dataclass(frozen=True)
class HookRecord:
    phase: Phase
    name: str
    started_at: float | None
    finished_at: float | None
    outcome: HookOutcome | None
    detail: str
    runs: int  # how many times it was started, across agent lives
    timeout_s: float | None = None  # the timeout it was started with (its own, or what the deadline left)
    process: ProcessIdentity | None = None  # its program's process group while it runs

    @property
    def finished(self) -> bool:
        return self.outcome is not None

    @property
    def interrupted(self) -> bool:
        """Started and never ended: the agent died while it ran."""
        return self.started_at is not None and self.outcome is None


@dataclass(frozen=True)
class EventRecord:
    event_id: str  # the server's id, or one the agent made up for a text-only server
    server_id: str | None
    kind: MigrationKind
    status: EventStatus
    first_seen: float  # wall clock, seconds since the epoch
    deadline: float | None  # wall clock
    not_before: float | None
    simulated: bool
    hooks: tuple[HookRecord, ...]
    data: dict[str, Any]

    def hook(self, phase: Phase, name: str) -> HookRecord | None:
        for rec in self.hooks:
            if rec.phase is phase and rec.name == name:
                return rec
        return None


class Journal:
    """The journal file. Not thread-safe: only the agent's main thread writes it."""

    def __init__(self, path: Path | None, *, wall: Callable[[], float] = time.time) -> None:
        """``path=None`` keeps the journal in memory only (``simulate``)."""
        self.path = path
        self._wall = wall
        self._doc: dict[str, Any] = {"version": JOURNAL_VERSION, "active": None, "events": {}}
        self._lock_fd: int | None = None

    @classmethod
    def open(
        cls, path: Path | None, *, wall: Callable[[], float] = time.time, read_only: bool = False
    ) -> Journal:
        """Load the journal at ``path`` (none yet: an empty one). ``read_only`` (``status``) raises
        :class:`JournalError` for an unreadable file instead of moving it aside."""
        journal = cls(path, wall=wall)
        journal._load(read_only=read_only)
        return journal

    @classmethod
    def open_locked(cls, path: Path | None, *, wall: Callable[[], float] = time.time) -> Journal:
        """Take the lock, then load: what the daemon does. Loading first could move aside (as unreadable)
        the file another running agent owns, or read it between two of its writes."""
        journal = cls(path, wall=wall)
        journal.lock()
        try:
            journal._load()
        except BaseException:
            journal.unlock()
            raise
        return journal

    # ---- locking: one agent per journal

    def lock(self) -> None:
        """Take the journal's lock for this process; :class:`AlreadyRunning` if another agent holds it."""
        if self.path is None or self._lock_fd is not None:
            return
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise JournalError(f"cannot open the journal lock {lock_path}: {e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            os.close(fd)
            raise AlreadyRunning(f"another guest-agent is running with the journal {self.path}") from e
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # ---- reading

    def active(self) -> EventRecord | None:
        """The event the agent is handling (not yet DONE/SUPERSEDED), if any."""
        event_id = self._doc["active"]
        return self.event(event_id) if event_id else None

    def event(self, event_id: str) -> EventRecord | None:
        raw = self._doc["events"].get(event_id)
        return _event_from_doc(event_id, raw) if raw is not None else None

    def events(self) -> list[EventRecord]:
        """All events kept, oldest first."""
        items = sorted(self._doc["events"].items(), key=lambda kv: kv[1]["first_seen"])
        return [_event_from_doc(k, v) for k, v in items]

    # ---- writing (each call is one atomic, durable save)

    def begin_event(
        self,
        *,
        event_id: str,
        server_id: str | None,
        kind: MigrationKind,
        deadline: float | None,
        not_before: float | None,
        simulated: bool = False,
        data: dict[str, Any] | None = None,
        inherit_from: str | None = None,
        inherit_phases: tuple[Phase, ...] = (),
    ) -> EventRecord:
        """Start tracking a new event (status NOTICED) and make it the active one.

        ``inherit_from`` another event copies its hook records of ``inherit_phases`` (a live event's drain
        counts for the offline event that replaces it: it is not run twice).
        """
        if event_id in self._doc["events"]:
            raise JournalError(f"event {event_id} is already in the journal")
        hooks: dict[str, Any] = {}
        if inherit_from is not None:
            prefixes = tuple(f"{p.value}/" for p in inherit_phases)
            for key, rec in self._raw(inherit_from)["hooks"].items():
                if key.startswith(prefixes):
                    hooks[key] = dict(rec)
        self._doc["events"][event_id] = {
            "server_id": server_id,
            # Checked, not stored blindly: a kind the schema refuses would get the whole journal moved aside
            # as unreadable at the next start.
            "kind": MigrationKind(kind).value,
            "status": EventStatus.NOTICED.value,
            "first_seen": self._wall(),
            "deadline": deadline,
            "not_before": not_before,
            "simulated": simulated,
            "history": [[EventStatus.NOTICED.value, self._wall()]],
            "hooks": hooks,
            "data": dict(data or {}),
        }
        self._doc["active"] = event_id
        self._prune()
        self._save()
        return self._get(event_id)

    def set_status(self, event_id: str, status: EventStatus) -> EventRecord:
        raw = self._raw(event_id)
        check_transition(EventStatus(raw["status"]), status)
        raw["status"] = status.value
        raw["history"].append([status.value, self._wall()])
        if status.terminal and self._doc["active"] == event_id:
            self._doc["active"] = None
        self._save()
        return self._get(event_id)

    def update_times(self, event_id: str, *, deadline: float | None, not_before: float | None) -> None:
        raw = self._raw(event_id)
        if (raw["deadline"], raw["not_before"]) != (deadline, not_before):
            raw["deadline"], raw["not_before"] = deadline, not_before
            self._save()

    def hook_started(self, event_id: str, phase: Phase, name: str, *, timeout_s: float | None = None) -> None:
        raw = self._raw(event_id)
        rec = raw["hooks"].setdefault(_hook_key(phase, name), {"runs": 0})
        rec.update(started_at=self._wall(), finished_at=None, outcome=None, detail="")
        rec.pop("process", None)
        if timeout_s is not None:
            rec["timeout_s"] = timeout_s
        rec["runs"] += 1
        self._save()

    def hook_process(self, event_id: str, phase: Phase, name: str, process: ProcessIdentity | None) -> None:
        """Record (or, with None, forget) the process group a running hook's program runs in."""
        rec = self._raw(event_id)["hooks"].setdefault(
            _hook_key(phase, name),
            {"runs": 0, "started_at": None, "finished_at": None, "outcome": None, "detail": ""},
        )
        if process is None:
            if rec.pop("process", None) is None:
                return
        else:
            rec["process"] = process.to_json()
        self._save()

    def hook_finished(
        self, event_id: str, phase: Phase, name: str, outcome: HookOutcome, detail: str = ""
    ) -> None:
        raw = self._raw(event_id)
        rec = raw["hooks"].setdefault(_hook_key(phase, name), {"runs": 0, "started_at": None})
        rec.update(finished_at=self._wall(), outcome=outcome.value, detail=detail[:500])
        rec.pop("process", None)  # a finished hook has no running program
        self._save()

    def put_data(self, event_id: str, key: str, value: Any) -> None:
        self._raw(event_id)["data"][key] = value
        self._save()

    # ---- internals

    def _get(self, event_id: str) -> EventRecord:
        return _event_from_doc(event_id, self._raw(event_id))

    def _raw(self, event_id: str) -> dict[str, Any]:
        try:
            raw: dict[str, Any] = self._doc["events"][event_id]
        except KeyError as e:
            raise JournalError(f"event {event_id} is not in the journal") from e
        return raw

    def _prune(self) -> None:
        events = self._doc["events"]
        finished = sorted(
            (k for k, v in events.items() if EventStatus(v["status"]).terminal),
            key=lambda k: events[k]["first_seen"],
        )
        for event_id in finished[: max(0, len(finished) - KEEP_FINISHED_EVENTS)]:
            del events[event_id]

    def _load(self, *, read_only: bool = False) -> None:
        if self.path is None or not self.path.exists():
            return
        try:
            doc = check_journal(json.loads(_read_capped(self.path, MAX_JOURNAL_BYTES)))
        except (
            OSError,
            ValueError,
            RecursionError,
        ) as e:  # JournalFormatError and JSON errors are ValueErrors
            if read_only:
                raise JournalError(f"cannot read the journal {self.path}: {_one_line(e)}") from e
            # Never crash-loop on a bad journal: keep it for a human and start a fresh one.
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(self._wall())}")
            log.error(
                "journal %s is unreadable (%s); moved aside to %s, starting a new one",
                self.path,
                _one_line(e),
                aside,
            )
            with contextlib.suppress(OSError):
                os.replace(self.path, aside)
            return
        self._doc = doc

    def _save(self) -> None:
        if self.path is None:
            return
        data = json.dumps(self._doc, indent=1, sort_keys=True).encode("utf-8")
        try:
            atomic_write(self.path, data)
        except OSError as e:
            raise JournalError(f"cannot write the journal {self.path}: {e}") from e


def atomic_write(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so a crash leaves the old or the new content, durably."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _read_capped(path: Path, max_bytes: int) -> bytes:
    """The file's bytes; ``ValueError`` past ``max_bytes`` (a journal that big is not ours: never load it)."""
    with path.open("rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"larger than {max_bytes} bytes")
    return data


def _one_line(e: BaseException) -> str:
    if isinstance(e, RecursionError):
        return "nested too deeply"
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _hook_key(phase: Phase, name: str) -> str:
    return f"{phase.value}/{name}"


def _event_from_doc(event_id: str, raw: dict[str, Any]) -> EventRecord:
    hooks = []
    for key, rec in raw["hooks"].items():
        phase_text, _, name = key.partition("/")
        outcome = rec.get("outcome")
        hooks.append(
            HookRecord(
                phase=Phase(phase_text),
                name=name,
                started_at=rec.get("started_at"),
                finished_at=rec.get("finished_at"),
                outcome=HookOutcome(outcome) if outcome is not None else None,
                detail=rec.get("detail", ""),
                runs=int(rec.get("runs", 0)),
                timeout_s=rec.get("timeout_s"),
                process=ProcessIdentity.from_json(rec["process"]) if rec.get("process") else None,
            )
        )
    return EventRecord(
        event_id=event_id,
        server_id=raw["server_id"],
        kind=MigrationKind(raw["kind"]),  # check_journal admitted only known kinds
        status=EventStatus(raw["status"]),
        first_seen=float(raw["first_seen"]),
        deadline=raw["deadline"],
        not_before=raw["not_before"],
        simulated=bool(raw.get("simulated", False)),
        hooks=tuple(hooks),
        data=dict(raw.get("data", {})),
    )


@contextlib.contextmanager
def locked(journal: Journal) -> Iterator[Journal]:
    journal.lock()
    try:
        yield journal
    finally:
        journal.unlock()
