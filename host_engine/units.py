"""Sizes with units: ``64GiB``, ``512M``, ``1.5TB`` → bytes, and back for display.

Binary suffixes (KiB, MiB, GiB, TiB, PiB and the short K, M, G, T, P as QEMU and libvirt use them) are
powers of 1024; decimal ones (kB/KB, MB, GB, TB, PB) powers of 1000. A size without a unit is refused,
because "4096" for a memory size is more often a mistake (MiB meant) than bytes.
"""

from __future__ import annotations

import re

from host_engine.errors import InvalidInput

_KIB = 1024
_UNITS: dict[str, int] = {
    "b": 1,
    "k": _KIB,
    "kib": _KIB,
    "m": _KIB**2,
    "mib": _KIB**2,
    "g": _KIB**3,
    "gib": _KIB**3,
    "t": _KIB**4,
    "tib": _KIB**4,
    "p": _KIB**5,
    "pib": _KIB**5,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "pb": 1000**5,
}
_SIZE = re.compile(r"([+-]?\d+(?:\.\d+)?)\s*([a-z]*)", re.ASCII)  # ASCII: full-width digits are not digits
# Far beyond any disk, memory or link (an exbibyte): a bigger number is a typo (and past ~1e308, inf).
MAX_SIZE_BYTES = _KIB**6


#: How much of a bad value an error message repeats (a pasted novel is not echoed back whole).
SHOWN_CHARS = 40


def _shown(text: str) -> str:
    return repr(text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "...")


def parse_size(text: str, *, field: str = "size") -> int:
    """Parse a size with a unit into bytes. Negative or unit-less sizes raise :class:`InvalidInput`."""
    m = _SIZE.fullmatch(text.strip().lower())
    if not m:
        raise InvalidInput(f"{field}: malformed size {_shown(text)} (e.g. 64GiB, 512MiB, 1TB)", field=field)
    number, unit = m.groups()
    if number.startswith("-"):
        raise InvalidInput(f"{field}: size must not be negative, got {_shown(text)}", field=field)
    if not unit:
        raise InvalidInput(f"{field}: size {_shown(text)} needs a unit (e.g. 64GiB, 512MiB)", field=field)
    if unit not in _UNITS:
        raise InvalidInput(
            f"{field}: unknown unit {unit!r} in {_shown(text)} (use KiB, MiB, GiB, TiB, GB, ...)", field=field
        )
    size = float(number) * _UNITS[unit]
    if not size <= MAX_SIZE_BYTES:
        raise InvalidInput(f"{field}: size {_shown(text)} is larger than 1 EiB", field=field)
    return int(size)


def format_size(size_bytes: int) -> str:
    """The shortest exact-enough binary form: ``64GiB``, ``1.5TiB``, ``512MiB``, ``100B``."""
    for suffix, factor in (
        ("PiB", _KIB**5),
        ("TiB", _KIB**4),
        ("GiB", _KIB**3),
        ("MiB", _KIB**2),
        ("KiB", _KIB),
    ):
        if abs(size_bytes) >= factor:
            value = size_bytes / factor
            text = f"{value:.1f}".rstrip("0").rstrip(".")
            return f"{text}{suffix}"
    return f"{size_bytes}B"
