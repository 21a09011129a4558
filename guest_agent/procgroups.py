"""Process groups a hook left behind: how to recognise one after a restart, wait for it, or end it.

Every hook program runs in its own session (``process.run_program``), so a ``kill -9`` of the agent does not
take it down: it keeps running. The agent records each running hook's process group in the journal
(:class:`ProcessIdentity`); a restarted agent finds the leftover there and waits for it (up to the hook's
timeout) or ends it, and only then decides whether to run the hook again — never beside the first copy.

A process group id alone is not an identity: after a reboot, or once the group is gone, the number can be
reused. So the record also holds the boot id and the leader's start time (clock ticks since boot, from
``/proc/PID/stat``). Linux never hands out a pid that is still some live group's id, so a group that still
has members with a matching boot id is ours unless a *different* leader (another start time) now owns the
number. Zombies (exited, not yet reaped — the reaper of an orphaned hook is not us) do not count as alive.

Linux-only, like the agent's systemd unit: without ``/proc`` nothing is recognised as a leftover.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PROC = Path("/proc")
BOOT_ID_PATH = PROC / "sys" / "kernel" / "random" / "boot_id"
POLL_S = 0.2
KILL_GRACE_S = 2.0  # between SIGTERM and SIGKILL, as for a hook that overruns in the running agent


@dataclass(frozen=True)
class ProcessIdentity:
    """What the journal keeps about a running hook's process group."""

    pgid: int
    boot_id: str
    start_ticks: int | None

    def to_json(self) -> dict[str, Any]:
        return {"pgid": self.pgid, "boot_id": self.boot_id, "start_ticks": self.start_ticks}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ProcessIdentity:
        return cls(pgid=int(doc["pgid"]), boot_id=str(doc["boot_id"]), start_ticks=doc["start_ticks"])


def boot_id() -> str:
    try:
        return BOOT_ID_PATH.read_text().strip()[:64]
    except OSError:
        return ""


def identify(pid: int) -> ProcessIdentity:
    """The identity of the group led by ``pid`` (a hook just started in its own session)."""
    stat = _stat(pid)
    return ProcessIdentity(pgid=pid, boot_id=boot_id(), start_ticks=stat[2] if stat else None)


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, pgrp, starttime) from ``/proc/PID/stat``, or None if there is no such process."""
    try:
        raw = (PROC / str(pid) / "stat").read_bytes()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: the fields after it follow the last ')'.
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        return fields[0].decode("ascii", "replace"), int(fields[2]), int(fields[19])
    except (IndexError, ValueError):
        return None


def alive(ident: ProcessIdentity) -> bool:
    """Does the recorded group still have a live (non-zombie) member, and is it still the same group?"""
    if not PROC.is_dir() or ident.boot_id != boot_id():
        return False  # rebooted since: nothing of it survived
    leader = _stat(ident.pgid)
    if leader is not None and ident.start_ticks is not None and leader[2] != ident.start_ticks:
        return False  # the number belongs to another process now
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st is not None and st[1] == ident.pgid and st[0] not in ("Z", "X"):
                return True
    return False


def wait_gone(
    ident: ProcessIdentity,
    timeout_s: float,
    *,
    sleep: Callable[[float], None] = time.sleep,
    monotonic: Callable[[], float] = time.monotonic,
    stop: Callable[[], bool] = lambda: False,
) -> bool:
    """Wait up to ``timeout_s`` for the group to end; True when it has, False at the timeout or ``stop()``."""
    deadline = monotonic() + timeout_s
    while alive(ident):
        if stop() or monotonic() >= deadline:
            return False
        sleep(min(POLL_S, max(0.0, deadline - monotonic())))
    return True


def end(ident: ProcessIdentity, *, grace_s: float = KILL_GRACE_S) -> bool:
    """SIGTERM the group, SIGKILL what is left after ``grace_s``; True when it is gone.

    Real time on purpose: this waits for real processes, whatever clock the caller runs on.
    """
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not alive(ident):
            return True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(ident.pgid, sig)
        if wait_gone(ident, grace_s):
            return True
    return not alive(ident)
