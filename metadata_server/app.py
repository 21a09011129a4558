"""Application factories: one WSGI app per listener, each opening its own store connection.

The two listeners run in separate processes (see ``serving.py``); both are built after the fork so no
SQLite connection crosses a ``fork()``. The factories also serve an operator's own gunicorn
(``gunicorn 'metadata_server.app:create_app("/var/lib/metadata-server/state.sqlite3")'``, see
docs/metadata-server.md), which passes Python literals: paths arrive as strings, numbers as ints or strings.
"""

from __future__ import annotations

from pathlib import Path

from flask import Flask

from .admin import create_admin_app
from .config import load_token
from .errors import ConfigError
from .guest import DEFAULT_MAX_WAITS_PER_DROPLET, GuestApp, GuestSettings
from .hub import DEFAULT_POLL_INTERVAL_S, Hub
from .metrics import Metrics
from .store import Store


def create_guest_app(
    db_path: Path | str,
    settings: GuestSettings | None = None,
    *,
    max_waits_per_droplet: int | str | None = None,
    poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
    watch: bool = True,
) -> GuestApp:
    """The guest listener's app; with ``watch`` it follows changes other processes commit.

    ``max_waits_per_droplet`` (per worker process) is for callers that give no ``settings``.
    """
    if settings is None:
        waits = (
            DEFAULT_MAX_WAITS_PER_DROPLET
            if max_waits_per_droplet is None
            else _positive_int(max_waits_per_droplet, "max_waits_per_droplet")
        )
        settings = GuestSettings(max_waits_per_droplet=waits)
    store = Store(_path(db_path, "db_path"))
    hub = Hub(store, poll_interval_s=poll_interval_s)
    if watch:
        hub.start()
    return GuestApp(store, hub, Metrics(), settings)


def create_app(
    db_path: Path | str, token: str | None = None, *, token_file: Path | str | None = None
) -> Flask:
    """The admin listener's Flask app.

    Without ``token`` the token is read as ``metadata-server serve`` reads it: from ``token_file`` (mode 600),
    else from the ``METADATA_SERVER_ADMIN_TOKEN`` environment variable; so it need not be on a command line.
    """
    if token is None:
        token = load_token(None if token_file is None else _path(token_file, "token_file"))
    return create_admin_app(Store(_path(db_path, "db_path")), token)


def _path(value: Path | str, name: str) -> Path:
    if isinstance(value, Path):
        return value
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{name} must be a file path, got {value!r}")
    return Path(value)


def _positive_int(value: int | str, name: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(value, str) and value.isascii() and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value
