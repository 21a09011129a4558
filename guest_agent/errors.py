"""Exceptions of the guest agent.

One root, :class:`GuestAgentError`. Each subclass carries the CLI exit code that says which kind of
problem it is, so ``cli.py`` turns any of them into one clear line and that code.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2  # click's own code for a bad flag
EXIT_CONFIG = 3
EXIT_UNAVAILABLE = 4
EXIT_HOOK_FAILED = 5


class GuestAgentError(Exception):
    """Root of every exception the guest agent raises on purpose."""

    exit_code = EXIT_ERROR


class ConfigError(GuestAgentError, ValueError):
    """The configuration is wrong; the message names the file and the key at fault."""

    exit_code = EXIT_CONFIG

    def __init__(self, message: str, *, key: str | None = None, source: str | None = None) -> None:
        self.key = key
        self.source = source
        where = ": ".join(part for part in (source, key) if part)
        super().__init__(f"{where}: {message}" if where else message)


class JournalError(GuestAgentError, OSError):
    """The journal could not be read or written (permissions, disk full, another agent holds it)."""


class AlreadyRunning(JournalError):
    """Another agent process holds the journal lock."""


class IllegalTransition(GuestAgentError, RuntimeError):
    """The state machine was asked for a transition its table does not allow (a bug, never user error)."""


class MetadataUnreachable(GuestAgentError, ConnectionError):
    """The metadata service could not be reached (transient: the daemon keeps trying)."""

    exit_code = EXIT_UNAVAILABLE


class AckRejected(GuestAgentError):
    """The metadata service refused an acknowledgement because the event is no longer the current one."""


class HookFailed(GuestAgentError):
    """At least one hook failed (used by ``simulate`` for its exit code)."""

    exit_code = EXIT_HOOK_FAILED
