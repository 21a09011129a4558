"""RFC 3339 timestamps as the API carries them: always UTC, second precision, a trailing ``Z``."""

from __future__ import annotations

from datetime import UTC, datetime


def parse_rfc3339(value: str) -> datetime:
    """Parse an RFC 3339 timestamp that carries an offset. Raises ValueError otherwise."""
    if not isinstance(value, str) or len(value) > 40 or "T" not in value.upper():
        raise ValueError("not an RFC 3339 timestamp")
    parsed = datetime.fromisoformat(value.replace("z", "Z"))
    if parsed.tzinfo is None:
        raise ValueError("an RFC 3339 timestamp needs an offset such as Z")
    return parsed.astimezone(UTC)


def format_rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def utc_now() -> str:
    return format_rfc3339(datetime.now(UTC))
