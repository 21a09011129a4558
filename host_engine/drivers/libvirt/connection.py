"""Reaching libvirt: the lazy imports, opening a connection, telling a live one from a dead one.

The only place the engine imports ``libvirt`` / ``libvirt_qemu``, and only when a function here is called, so
the rest of the engine (and its tests) runs without libvirt-python installed.
"""

from __future__ import annotations

import contextlib
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping
from typing import Any

from host_engine.drivers.base import DriverError

NOT_INSTALLED = "libvirt-python is not installed (pip install 'droplet-live-migration[libvirt]')"


def libvirt_module() -> Any:
    """The ``libvirt`` module, imported on first use."""
    try:
        import libvirt
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise DriverError(NOT_INSTALLED) from e
    return libvirt


def libvirt_qemu_module() -> Any:
    """The ``libvirt_qemu`` module (QMP pass-through), imported on first use."""
    try:
        import libvirt_qemu
    except ImportError as e:  # pragma: no cover
        raise DriverError(NOT_INSTALLED) from e
    return libvirt_qemu


def open_uri(uri: str) -> Any:
    """A new connection to ``uri``; ``DriverError`` when the daemon cannot be reached."""
    lv = libvirt_module()
    _quiet(lv)
    try:
        return lv.open(uri)
    except lv.libvirtError as e:
        raise DriverError(f"cannot connect to {uri}: {e}") from e


def _quiet(lv: Any) -> None:
    # libvirt prints every error to stderr by default; ours are raised as exceptions instead.
    lv.registerErrorHandler(lambda _ctx, _err: None, None)


def alive(conn: Any) -> bool:
    """Whether ``conn`` still answers (a restarted daemon leaves a connection that only looks open)."""
    try:
        return bool(conn.isAlive()) and conn.getLibVersion() > 0
    except Exception:
        return False


def lookup(conn: Any, name: str) -> Any | None:
    """The domain called ``name`` on ``conn``, or None."""
    lv = libvirt_module()
    try:
        return conn.lookupByName(name)
    except lv.libvirtError:
        return None


@contextlib.contextmanager
def errors(what: str, *, target_at_fault: bool = False) -> Iterator[None]:
    """libvirt's exceptions as ``DriverError`` (what the executor handles), with what was being done."""
    lv = libvirt_module()
    try:
        yield
    except lv.libvirtError as e:
        raise DriverError(f"{what}: {e}", target_at_fault=target_at_fault) from e


def int_option(options: Mapping[str, str], name: str, default: int) -> int:
    """``options[name]`` as a non-negative whole number (``default`` when absent)."""
    try:
        value = int(options.get(name, default))
    except ValueError as e:
        raise DriverError(f"options.{name} must be a whole number, not {options[name]!r}") from e
    if value < 0:
        raise DriverError(f"options.{name} must not be negative")
    return value


def parse_xml(xml: str) -> ET.Element:
    """An XML description libvirtd produced (never a user's)."""
    return ET.fromstring(xml)  # noqa: S314 - XML produced by libvirtd itself, not by a user
