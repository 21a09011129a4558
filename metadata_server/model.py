"""What the server knows about one droplet, and the exact bytes a guest gets for it.

A ``DropletView`` is immutable and built once per change; the guest hot path only looks it up by the
request's source address and writes out bytes computed here.
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any


class EventKind(enum.Enum):
    LIVE_MIGRATE = "live_migrate"
    OFFLINE_MIGRATE = "offline_migrate"


class EventState(enum.Enum):
    SCHEDULED = "scheduled"
    IN_PROGRESS = "in_progress"


class AckAction(enum.Enum):
    READY = "ready"
    OFFLINE = "offline"


@dataclass(frozen=True)
class Ack:
    action: AckAction
    power_on_after: bool
    at: str  # RFC 3339, UTC


@dataclass(frozen=True)
class Expectation:
    """What the engine predicts for a migration: the guest's pause and the whole copy. None: unknown."""

    downtime_ms: float | None = None
    duration_s: float | None = None


UNKNOWN = Expectation()


@dataclass(frozen=True)
class Event:
    id: str
    kind: EventKind
    state: EventState
    not_before: str | None
    deadline: str | None
    notified_at: str
    ack: Ack | None = None
    # The engine's prediction for this migration (optional; None when it did not say).
    expected_downtime_ms: float | None = None
    expected_duration_s: float | None = None


@dataclass(frozen=True)
class Droplet:
    id: str
    addresses: tuple[str, ...]
    hostname: str | None = None
    region: str | None = None
    event: Event | None = None


def guest_details(event: Event | None) -> dict[str, Any]:
    """The JSON details document (docs/metadata-server.md, "Guest API"), without the etag."""
    if event is None:
        return {
            "event": "",
            "id": None,
            "state": None,
            "not_before": None,
            "notified_at": None,
            "deadline": None,
            "acknowledged": None,
            "power_on_after": None,
            "expected_downtime_ms": None,
            "expected_duration_s": None,
        }
    return {
        "event": event.kind.value,
        "id": event.id,
        "state": event.state.value,
        "not_before": event.not_before,
        "notified_at": event.notified_at,
        "deadline": event.deadline,
        "acknowledged": event.ack.action.value if event.ack else None,
        "power_on_after": event.ack.power_on_after if event.ack else None,
        "expected_downtime_ms": event.expected_downtime_ms,
        "expected_duration_s": event.expected_duration_s,
    }


def compute_etag(event: Event | None) -> str:
    """A strong ETag over exactly what the guest can see; stable across restarts and processes.

    The expected downtime and duration join the material only when one is set, so an event without
    them keeps the ETag it had before the server knew about them (a guest's ``last_etag`` stays valid).
    """
    if event is None:
        material = "none"
    else:
        ack = event.ack
        parts: list[object] = [
            event.kind.value,
            event.id,
            event.state.value,
            event.not_before,
            event.deadline,
            ack.action.value if ack else None,
            ack.power_on_after if ack else None,
        ]
        if event.expected_downtime_ms is not None or event.expected_duration_s is not None:
            parts += [event.expected_downtime_ms, event.expected_duration_s]
        material = json.dumps(parts, separators=(",", ":"))
    return hashlib.sha256(material.encode()).hexdigest()[:20]


@dataclass(frozen=True)
class DropletView:
    """A droplet plus the precomputed guest answers. Built by ``DropletView.of``."""

    droplet: Droplet
    etag: str
    text_body: bytes
    json_body: bytes
    details: dict[str, Any] = field(compare=False)

    @classmethod
    def of(cls, droplet: Droplet) -> DropletView:
        etag = compute_etag(droplet.event)
        details = guest_details(droplet.event)
        details["etag"] = etag
        text = droplet.event.kind.value if droplet.event else ""
        return cls(
            droplet=droplet,
            etag=etag,
            text_body=text.encode(),
            json_body=json.dumps(details, separators=(",", ":")).encode(),
            details=details,
        )

    @property
    def quoted_etag(self) -> str:
        return f'"{self.etag}"'
