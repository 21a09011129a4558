"""The maintenance event as the guest sees it, and how it is read off the wire (docs/sdk.md, "The event")."""

from __future__ import annotations

import enum
import json
import math
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from guest_sdk.errors import ProtocolError

# A value of the text endpoint, once surrounding whitespace is stripped. Anything else (spaces inside,
# markup, control characters) is not a value the service would send but an error page or garbage.
_VALUE_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
MAX_ETAG_CHARS = 128


class EventKind(enum.Enum):
    """What the service says is coming. ``OTHER`` is a value this SDK does not know (see ``raw``)."""

    NONE = "none"
    LIVE_MIGRATE = "live_migrate"
    OFFLINE_MIGRATE = "offline_migrate"
    OTHER = "other"

    @classmethod
    def from_value(cls, value: str) -> EventKind:
        """Map a (stripped) endpoint value to a kind; an unknown value is ``OTHER``, never an error."""
        if value == "":
            return cls.NONE
        if value == "live_migrate":
            return cls.LIVE_MIGRATE
        if value == "offline_migrate":
            return cls.OFFLINE_MIGRATE
        return cls.OTHER


class AckAction(enum.Enum):
    """What the guest tells the service when it acknowledges an event."""

    READY = "ready"  # drained: the engine may start early
    OFFLINE = "offline"  # the guest will power off; the engine migrates it offline


@dataclass(frozen=True)
class MaintenanceEvent:
    """One reading of the droplet's maintenance event.

    ``raw`` is exactly what the service sent as the value (the text body, or the JSON ``event`` field);
    ``kind`` is what it means, whitespace ignored. Fields the server did not say are ``None`` — a plain
    text-only server says only the value.

    >>> ev = MaintenanceEvent.from_text("live_migrate\\n")
    >>> ev.kind is EventKind.LIVE_MIGRATE, ev.scheduled, ev.id
    (True, True, None)
    """

    kind: EventKind
    raw: str
    id: str | None = None
    state: str | None = None
    not_before: datetime | None = None
    deadline: datetime | None = None
    acknowledged: str | None = None
    etag: str | None = None
    notified_at: datetime | None = None
    power_on_after: bool | None = None
    # The service's prediction, when it gives one: how long the guest will be paused (milliseconds)
    # and how long the whole migration will take (seconds). A value that is not a number >= 0 is None.
    expected_downtime_ms: float | None = None
    expected_duration_s: float | None = None

    @property
    def scheduled(self) -> bool:
        """True when any event (known or not) is pending: the opposite of ``kind is EventKind.NONE``."""
        return self.kind is not EventKind.NONE

    @property
    def value(self) -> str:
        """The value with surrounding whitespace stripped: ``""``, ``"live_migrate"``, ..."""
        return self.raw.strip()

    def same_content(self, other: MaintenanceEvent | None) -> bool:
        """True when ``other`` says the same thing (the ETag, a transport detail, is not compared)."""
        if other is None:
            return False
        return (
            self.kind,
            self.value,
            self.id,
            self.state,
            self.not_before,
            self.deadline,
            self.acknowledged,
            self.power_on_after,
            self.expected_downtime_ms,
            self.expected_duration_s,
        ) == (
            other.kind,
            other.value,
            other.id,
            other.state,
            other.not_before,
            other.deadline,
            other.acknowledged,
            other.power_on_after,
            other.expected_downtime_ms,
            other.expected_duration_s,
        )

    def to_json_dict(self) -> dict[str, Any]:
        """The event in the server's JSON shape plus ``kind``; times as RFC 3339 strings."""
        return {
            "event": self.value,
            "kind": self.kind.value,
            "id": self.id,
            "state": self.state,
            "not_before": _format_time(self.not_before),
            "notified_at": _format_time(self.notified_at),
            "deadline": _format_time(self.deadline),
            "acknowledged": self.acknowledged,
            "power_on_after": self.power_on_after,
            "expected_downtime_ms": self.expected_downtime_ms,
            "expected_duration_s": self.expected_duration_s,
            "etag": self.etag,
        }

    @classmethod
    def from_text(cls, body: str, *, etag: str | None = None) -> MaintenanceEvent:
        """Build an event from the text endpoint's body (``GET /v1/maintenance_event``).

        Raises :class:`ProtocolError` when the body is not a value at all (markup, spaces, controls).
        """
        value = body.strip()
        if value and not _VALUE_RE.fullmatch(value):
            raise ProtocolError(f"maintenance_event body is not an event value: {_preview(body)}")
        return cls(kind=EventKind.from_value(value), raw=body, etag=etag)

    @classmethod
    def from_json(cls, doc: object, *, etag: str | None = None) -> MaintenanceEvent:
        """Build an event from the JSON document (``GET /v1/maintenance_event.json``, ack answers).

        The body's ``etag`` wins over the header's (they are the same on our server). Raises
        :class:`ProtocolError` for a document of the wrong shape.
        """
        if not isinstance(doc, dict):
            raise ProtocolError(f"maintenance_event.json is not a JSON object: {_preview(json.dumps(doc))}")
        if "event" not in doc:
            # Reading a document without the field as "no event" would be the silent answer we never give.
            raise ProtocolError("maintenance_event.json has no 'event' field")
        raw = doc["event"]
        if raw is None:
            raw = ""
        if not isinstance(raw, str):
            raise ProtocolError("maintenance_event.json: 'event' is not a string")
        value = raw.strip()
        if value and not _VALUE_RE.fullmatch(value):
            raise ProtocolError(f"maintenance_event.json: 'event' is not an event value: {_preview(raw)}")
        # An ``acknowledged`` value this SDK does not know (a newer server) is reported, not refused.
        acknowledged = _opt_str(doc, "acknowledged")
        body_etag = _opt_str(doc, "etag")
        return cls(
            kind=EventKind.from_value(value),
            raw=raw,
            id=_opt_str(doc, "id"),
            state=_opt_str(doc, "state"),
            not_before=_opt_time(doc, "not_before"),
            deadline=_opt_time(doc, "deadline"),
            acknowledged=acknowledged,
            etag=normalize_etag(body_etag) if body_etag is not None else etag,
            notified_at=_opt_time(doc, "notified_at"),
            power_on_after=_opt_bool(doc, "power_on_after"),
            expected_downtime_ms=_lenient_amount(doc, "expected_downtime_ms"),
            expected_duration_s=_lenient_amount(doc, "expected_duration_s"),
        )


def normalize_etag(value: str | None) -> str | None:
    """The opaque ETag value: weak prefix and quotes removed; ``None`` when absent or unusable.

    >>> normalize_etag('"abc123"'), normalize_etag("abc123"), normalize_etag('W/"x"'), normalize_etag("")
    ('abc123', 'abc123', 'x', None)
    """
    if value is None:
        return None
    tag = value.strip()
    if tag.startswith("W/"):
        tag = tag[2:]
    if len(tag) >= 2 and tag[0] == tag[-1] == '"':
        tag = tag[1:-1]
    if not tag or len(tag) > MAX_ETAG_CHARS or not all(0x21 <= ord(c) <= 0x7E for c in tag):
        return None
    return tag


def _opt_str(doc: dict[str, Any], key: str) -> str | None:
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ProtocolError(f"maintenance_event.json: {key!r} is not a string or null")
    return value


def _opt_bool(doc: dict[str, Any], key: str) -> bool | None:
    value = doc.get(key)
    if value is None or isinstance(value, bool):
        return value
    raise ProtocolError(f"maintenance_event.json: {key!r} is not a boolean or null")


def _lenient_amount(doc: dict[str, Any], key: str) -> float | None:
    """An advisory number: anything but a finite number >= 0 reads as unknown, never an error."""
    value = doc.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        amount = float(value)
    except OverflowError:  # an integer too large for a float
        return None
    return amount if math.isfinite(amount) and amount >= 0 else None


def _opt_time(doc: dict[str, Any], key: str) -> datetime | None:
    text = _opt_str(doc, key)
    if text is None or text == "":
        return None
    try:
        when = datetime.fromisoformat(text)
    except ValueError as e:
        raise ProtocolError(
            f"maintenance_event.json: {key!r} is not an RFC 3339 time: {_preview(text)}"
        ) from e
    if when.tzinfo is None:
        raise ProtocolError(f"maintenance_event.json: {key!r} has no UTC offset: {_preview(text)}")
    return when


def _format_time(when: datetime | None) -> str | None:
    if when is None:
        return None
    return when.isoformat().replace("+00:00", "Z")


def _preview(text: str, limit: int = 60) -> str:
    """A short, printable rendering of untrusted text for an error message."""
    shown = text if len(text) <= limit else text[:limit] + "..."
    return repr(shown)
