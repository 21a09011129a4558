"""Running one external program the way every hook does: argv (no shell), a timeout, output logged.

The program gets its own session (process group), so a terminal's Ctrl-C or systemd's SIGTERM to the agent
does not kill it mid-step, and a timeout kills the whole group it may have spawned.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO

log = logging.getLogger(__name__)

KILL_GRACE_S = 2.0  # between SIGTERM and SIGKILL when a program overruns
READER_JOIN_S = 1.0  # a background child may keep the output pipe open; do not wait on it forever
# A hook's output goes to the journal: bound what one hook can put there, and what one line can hold.
MAX_LINE_BYTES = 4096
MAX_LOGGED_LINES = 10_000


@dataclass(frozen=True)
class ProcessResult:
    returncode: int | None  # None: it could not start, or it was killed at the timeout
    timed_out: bool = False
    error: str | None = None  # why it could not start

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def describe(self) -> str:
        if self.error is not None:
            return f"could not start: {self.error}"
        if self.timed_out:
            return "killed at its timeout"
        return f"exit status {self.returncode}"


def run_program(
    argv: Sequence[str],
    *,
    label: str,
    timeout_s: float,
    stdin: bytes = b"",
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    on_start: Callable[[int], None] | None = None,
) -> ProcessResult:
    """Run ``argv``, feed it ``stdin``, log each output line as ``label: line``, stop it at ``timeout_s``.

    ``on_start(pid)`` is called as soon as the program runs (its pid is its process group's id): the agent
    journals it, so a restarted agent can find a hook that outlived it (``procgroups``).
    """
    try:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
            close_fds=True,
        )
    except OSError as e:
        return ProcessResult(returncode=None, error=f"{argv[0]}: {e.strerror or e}")
    if proc.stdin is None or proc.stdout is None:  # cannot happen with PIPE; keeps the types honest
        raise RuntimeError("subprocess pipes missing")
    if on_start is not None:
        try:
            on_start(proc.pid)
        except BaseException:
            _kill_group(proc)  # it could not be recorded: do not leave it running unrecorded
            raise
    reader = threading.Thread(target=_log_lines, args=(proc.stdout, label), daemon=True)
    reader.start()
    writer = threading.Thread(target=_feed, args=(proc.stdin, stdin), daemon=True)
    writer.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc)
    reader.join(READER_JOIN_S)
    return ProcessResult(returncode=None if timed_out else proc.returncode, timed_out=timed_out)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    for sig, wait_s in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, KILL_GRACE_S)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _feed(pipe: IO[bytes], data: bytes) -> None:
    try:
        pipe.write(data)
    except OSError:
        pass  # the program did not read its stdin: that is its right
    finally:
        with contextlib.suppress(OSError):
            pipe.close()


def _log_lines(pipe: IO[bytes], label: str) -> None:
    """Log each line as ``label: line``: cut at MAX_LINE_BYTES, control characters escaped so a hook
    cannot forge log lines or send terminal escapes, at most MAX_LOGGED_LINES (the rest is drained)."""
    logged = 0
    with pipe:
        while raw := pipe.readline(MAX_LINE_BYTES):
            cut = not raw.endswith(b"\n") and len(raw) >= MAX_LINE_BYTES
            while cut and (rest := pipe.readline(MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
                pass  # skip the remainder of an over-long line
            if logged < MAX_LOGGED_LINES:
                log.info("%s: %s%s", label, printable(raw), " [line cut]" if cut else "")
            elif logged == MAX_LOGGED_LINES:
                log.warning(
                    "%s: more than %d lines of output; the rest is not logged", label, MAX_LOGGED_LINES
                )
            logged += 1


def printable(raw: bytes) -> str:
    """One line of program output as safe log text: UTF-8 (invalid bytes replaced), controls escaped."""
    text = raw.decode("utf-8", "replace").rstrip("\r\n")
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
