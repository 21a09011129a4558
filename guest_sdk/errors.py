"""Exceptions raised by the guest SDK.

One root, :class:`GuestSDKError`; each subclass is named for what the caller can do about it. Where a
builtin means the same thing the subclass inherits it too, so ``except TimeoutError`` also catches
:class:`WaitTimeout` (the shape of ``requests.ConnectTimeout(ConnectionError, Timeout)``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from guest_sdk.models import MaintenanceEvent


class GuestSDKError(Exception):
    """Root of every exception the guest SDK raises."""


class MetadataUnavailable(GuestSDKError, ConnectionError):
    """The metadata service could not be reached, or kept failing, after the retries.

    Transient by nature: calling again later is the right response. It is never turned into "no event":
    ``last_known`` carries the last event this client saw (``None`` if it saw none), so a caller that
    knew of a migration keeps knowing of it while the service is down.
    """

    def __init__(self, message: str, *, last_known: MaintenanceEvent | None = None) -> None:
        super().__init__(message)
        self.last_known = last_known


class NotOnDroplet(GuestSDKError):
    """The service answered 404: the address this request came from belongs to no droplet."""


class ProtocolError(GuestSDKError, ValueError):
    """The service answered something this client cannot read (malformed, oversized, a redirect, ...)."""


class RequestRejected(GuestSDKError):
    """The service refused the request with a 4xx status that retrying will not fix.

    ``status`` is the HTTP status; ``code`` and ``field`` come from the server's JSON error body when
    it sent one, else ``None``.
    """

    def __init__(
        self, message: str, *, status: int, code: str | None = None, field: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.field = field


class EventConflict(RequestRejected):
    """``acknowledge`` named an event that is not the current one (409): read the event again."""


class NotSupportedByServer(GuestSDKError):
    """The server only speaks the plain text endpoint, and the call needs more (e.g. ``acknowledge``)."""


class WaitTimeout(GuestSDKError, TimeoutError):
    """``wait`` / ``wait_until_clear`` / ``watch`` ran out of time before the awaited change.

    ``last_event`` is what the service said last, so the caller can tell what it was still seeing.
    """

    def __init__(self, message: str, *, last_event: MaintenanceEvent | None = None) -> None:
        super().__init__(message)
        self.last_event = last_event
