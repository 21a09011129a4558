"""Application factories: one WSGI app per listener, each opening its own store connection.

The two listeners run in separate processes (see ``serving.py``); both are built after the fork so no
SQLite connection crosses a ``fork()``.
"""

from __future__ import annotations

from pathlib import Path

from flask import Flask

from .admin import create_admin_app
from .guest import GuestApp, GuestSettings
from .hub import DEFAULT_POLL_INTERVAL_S, Hub
from .metrics import Metrics
from .store import Store


def create_guest_app(
    db_path: Path,
    settings: GuestSettings | None = None,
    *,
    poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
    watch: bool = True,
) -> GuestApp:
    """The guest listener's app; with ``watch`` it follows changes other processes commit."""
    store = Store(db_path)
    hub = Hub(store, poll_interval_s=poll_interval_s)
    if watch:
        hub.start()
    return GuestApp(store, hub, Metrics(), settings or GuestSettings())


def create_app(db_path: Path, token: str) -> Flask:
    """The admin listener's Flask app."""
    return create_admin_app(Store(db_path), token)
