"""Errors of the metadata server. One root; the CLI maps each kind to an exit code."""

from __future__ import annotations


class MetadataServerError(Exception):
    """Root of every error this package raises."""

    exit_code = 1


class ConfigError(MetadataServerError):
    """A flag, environment variable or file given to the server is wrong. Exit code 2."""

    exit_code = 2


class ListenError(MetadataServerError):
    """A listener could not be opened (port in use, address not on this host). Exit code 3."""

    exit_code = 3


class ValidationError(MetadataServerError):
    """A request body or parameter is malformed. Becomes HTTP 400 naming ``field``."""

    def __init__(self, message: str, *, field: str | None = None, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.field = field
        self.code = code


class NotFound(MetadataServerError):
    """No droplet with that id (admin) or address (guest)."""


class Conflict(MetadataServerError):
    """The request contradicts the current state (an address owned by another droplet, a stale ack)."""

    def __init__(self, message: str, *, code: str = "conflict") -> None:
        super().__init__(message)
        self.code = code
