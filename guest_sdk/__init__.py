"""Client for the droplet maintenance-event endpoint (docs/sdk.md).

>>> from guest_sdk import MaintenanceClient, EventKind
>>> with MaintenanceClient() as client:                  # doctest: +SKIP
...     if client.event().kind is EventKind.LIVE_MIGRATE:
...         print("a live migration is coming")
"""

from guest_sdk.client import MaintenanceClient
from guest_sdk.errors import (
    EventConflict,
    GuestSDKError,
    MetadataUnavailable,
    NotOnDroplet,
    NotSupportedByServer,
    ProtocolError,
    RequestRejected,
    WaitTimeout,
)
from guest_sdk.models import AckAction, EventKind, MaintenanceEvent

__all__ = [
    "AckAction",
    "EventConflict",
    "EventKind",
    "GuestSDKError",
    "MaintenanceClient",
    "MaintenanceEvent",
    "MetadataUnavailable",
    "NotOnDroplet",
    "NotSupportedByServer",
    "ProtocolError",
    "RequestRejected",
    "WaitTimeout",
]
