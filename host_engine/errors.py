"""The host engine's exceptions: one root, subclasses named for what the caller can do.

Every error a user can cause ends the CLI with one line on stderr and the class's ``exit_code``:

| code | class | meaning |
| --- | --- | --- |
| 1 | ``HostEngineError`` | anything else |
| 2 | ``InvalidInput`` | a malformed or out-of-range value (a size, a time, a flag) |
| 3 | ``NotFound`` | an unknown host, droplet or migration |
| 4 | ``Conflict`` | the request contradicts the store (a duplicate, an illegal state change) |
| 5 | ``NoCapacity`` | placement found no host for a droplet |
| 6 | ``ConfigError`` | the configuration file or environment is wrong |
| 7 | ``StoreError`` | the database failed or has an unknown schema |
| 8 | ``TransientError`` | a remote side (metadata server, hypervisor) is unreachable: safe to retry |
| 9 | ``MigrationIncomplete`` | a migration run at once did not complete (cancelled, offline required) |
"""

from __future__ import annotations


class HostEngineError(Exception):
    """Root of every error the host engine raises on purpose."""

    exit_code = 1


class InvalidInput(HostEngineError, ValueError):
    """A value given by the user (or a caller) is malformed or out of range."""

    exit_code = 2

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class NotFound(HostEngineError, LookupError):
    """An unknown host, droplet or migration."""

    exit_code = 3


class Conflict(HostEngineError):
    """The request contradicts what the store holds (duplicate id, busy droplet, ...)."""

    exit_code = 4


class IllegalTransition(Conflict):
    """A migration state change that the transition table does not allow."""

    def __init__(self, migration_id: str, from_state: str, to_state: str) -> None:
        super().__init__(f"migration {migration_id}: illegal transition {from_state} -> {to_state}")
        self.migration_id = migration_id
        self.from_state = from_state
        self.to_state = to_state


class StaleClaim(Conflict):
    """The migration is claimed by another worker (or the claim was lost)."""


class NoCapacity(HostEngineError):
    """Placement found no host that can take a droplet."""

    exit_code = 5


class ConfigError(HostEngineError):
    """The configuration (file, environment, flags) is wrong."""

    exit_code = 6


class StoreError(HostEngineError):
    """The database failed, or holds a schema this code does not know."""

    exit_code = 7


class TransientError(HostEngineError):
    """A remote side is unreachable or overloaded right now: safe to retry later."""

    exit_code = 8


class NotifierError(HostEngineError):
    """The metadata server's admin API refused a request (a permanent error: do not retry)."""

    exit_code = 8

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class AdminAPIUnavailable(NotifierError, TransientError):
    """The metadata server's admin API could not be reached or answered 5xx/429 after retries."""


class InventoryError(HostEngineError):
    """Reading a hypervisor's domains failed."""

    exit_code = 8


class MigrationIncomplete(HostEngineError):
    """A migration the command waited for ended otherwise than completed (``host-engine migrate --now``)."""

    exit_code = 9
