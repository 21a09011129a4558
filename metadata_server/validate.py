"""Parsing and validation of request bodies and parameters. Each failure names the field at fault."""

from __future__ import annotations

import enum
import ipaddress
import json
import re
from typing import Any, TypeVar

from .errors import ValidationError
from .timefmt import format_rfc3339, parse_rfc3339

DROPLET_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
EVENT_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")
MAX_ETAG_CHARS = 128
MIN_TIMEOUT_S, MAX_TIMEOUT_S = 1, 300
MAX_ADDRESSES = 64
MAX_TEXT_FIELD = 253  # a DNS name's limit; plenty for a region too
MAX_EXPECTED_DOWNTIME_MS = 3_600_000.0  # an hour: beyond that it is not a live migration's pause
MAX_EXPECTED_DURATION_S = 7 * 24 * 3600.0

E = TypeVar("E", bound=enum.Enum)


def json_object(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise ValidationError("the request body must be a JSON object", code="invalid_json")
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValidationError(f"the request body is not valid JSON: {e}", code="invalid_json") from e
    except RecursionError as e:  # arrays/objects nested deeper than Python's recursion limit
        raise ValidationError("the request body is nested too deeply", code="invalid_json") from e
    if not isinstance(value, dict):
        raise ValidationError("the request body must be a JSON object", code="invalid_json")
    return value


def no_unknown_fields(body: dict[str, Any], allowed: set[str]) -> None:
    for key in body:
        if key not in allowed:
            raise ValidationError(f"unknown field {key!r}", field=key, code="unknown_field")


def droplet_id(value: str) -> str:
    if not DROPLET_ID_RE.fullmatch(value):
        raise ValidationError("droplet id must be 1-64 of [A-Za-z0-9._-]", field="id")
    return value


def addresses(body: dict[str, Any]) -> list[str]:
    value = body.get("addresses")
    if not isinstance(value, list) or not value:
        raise ValidationError("addresses must be a non-empty list of IP addresses", field="addresses")
    if len(value) > MAX_ADDRESSES:
        raise ValidationError(f"at most {MAX_ADDRESSES} addresses per droplet", field="addresses")
    out = [address(item) for item in value]
    if len(set(out)) != len(out):
        raise ValidationError("addresses contains a duplicate", field="addresses")
    return out


def address(item: object) -> str:
    """One droplet address in the form the guest listener sees it as a TCP source address.

    An IPv4-mapped IPv6 address (``::ffff:10.0.0.1``) is the IPv4 address itself, so it is stored as
    such and the uniqueness check sees both spellings as one. A scoped address (``fe80::1%eth0``) is
    refused: a socket's source address never carries the scope, so it could never match.
    """
    if not isinstance(item, str):
        raise ValidationError("addresses must be strings", field="addresses")
    try:
        ip = ipaddress.ip_address(item)
    except ValueError as e:
        raise ValidationError(f"{item[:64]!r} is not an IP address", field="addresses") from e
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id is not None:
            raise ValidationError(
                f"{item[:64]!r} carries a scope (%{ip.scope_id}); give the address without it",
                field="addresses",
            )
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
    return str(ip)


def optional_text(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_TEXT_FIELD or not value.isprintable():
        raise ValidationError(
            f"{name} must be a printable string of 1-{MAX_TEXT_FIELD} characters", field=name
        )
    return value


def required_member(body: dict[str, Any], name: str, cls: type[E]) -> E:
    """``body[name]`` as the member of ``cls`` with that value; else an error naming every value."""
    choices = tuple(str(member.value) for member in cls)
    value = body.get(name)
    if not isinstance(value, str) or value not in choices:
        raise ValidationError(f"{name} must be one of {', '.join(choices)}", field=name)
    return cls(value)


def event_id(body: dict[str, Any]) -> str:
    value = body.get("id")
    if not isinstance(value, str) or not EVENT_ID_RE.fullmatch(value):
        raise ValidationError("id must be 1-64 of [A-Za-z0-9._:-]", field="id")
    return value


def optional_time(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    try:
        return format_rfc3339(parse_rfc3339(value))
    except (ValueError, TypeError) as e:
        raise ValidationError(
            f"{name} must be an RFC 3339 time with an offset, e.g. 2026-12-01T02:00:00Z", field=name
        ) from e


def optional_amount(body: dict[str, Any], name: str, maximum: float) -> float | None:
    """An optional finite number from 0 to ``maximum`` (JSON booleans are not numbers here)."""
    value = body.get(name)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 <= value <= maximum  # NaN fails both comparisons; inf fails the upper one
    ):
        raise ValidationError(f"{name} must be a number from 0 to {maximum:g}", field=name)
    return float(value)


def deadline_not_before(not_before: str | None, deadline: str | None) -> None:
    """A deadline before ``not_before`` would tell the guest its drain time is over before it began."""
    if (
        not_before is not None
        and deadline is not None
        and parse_rfc3339(deadline) < parse_rfc3339(not_before)
    ):
        raise ValidationError(
            f"deadline {deadline} is before not_before {not_before}; it must be at or after it",
            field="deadline",
        )


def is_ascii_number(value: str) -> bool:
    """``str.isdigit`` also accepts digits of other scripts (``"١٢"``), which ``int()`` then converts."""
    return value.isascii() and value.isdigit()


def optional_bool(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise ValidationError(f"{name} must be true or false", field=name)
    return value


def last_etag(value: str | None) -> str | None:
    if value is None:
        return None
    if len(value) > MAX_ETAG_CHARS or not value.isascii() or not value.isprintable():
        raise ValidationError(
            f"last_etag must be at most {MAX_ETAG_CHARS} printable ASCII characters", field="last_etag"
        )
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    return value


def wait_flag(value: str | None) -> bool:
    if value is None or value == "false":
        return False
    if value == "true":
        return True
    raise ValidationError("wait_for_change must be true or false", field="wait_for_change")


def timeout_sec(value: str | None, default: int) -> int:
    if value is None:
        return default
    if not is_ascii_number(value) or not MIN_TIMEOUT_S <= int(value) <= MAX_TIMEOUT_S:
        raise ValidationError(
            f"timeout_sec must be an integer from {MIN_TIMEOUT_S} to {MAX_TIMEOUT_S}", field="timeout_sec"
        )
    return int(value)
