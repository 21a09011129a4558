from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from werkzeug.test import Client

from metadata_server.app import create_app, create_guest_app
from metadata_server.guest import GuestApp, GuestSettings

TOKEN = "t" * 32
AUTH = {"Authorization": f"Bearer {TOKEN}"}
D1, D2 = "127.0.0.2", "127.0.0.3"  # the two droplets of `two_droplets`


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state.sqlite3"


@pytest.fixture
def admin_app(db: Path) -> Flask:
    return create_app(db, TOKEN)


@pytest.fixture
def admin(admin_app: Flask) -> Iterator[Client]:
    with admin_app.test_client() as c:
        yield c


@pytest.fixture
def guest_app(db: Path, admin_app: Flask) -> Iterator[GuestApp]:
    # A short poll interval: the watcher picks up the admin app's writes as it does across processes.
    app = create_guest_app(db, GuestSettings(max_waits_per_droplet=2), poll_interval_s=0.01)
    yield app
    app.hub.shutdown()


@pytest.fixture
def two_droplets(admin: Client, guest_app: GuestApp) -> GuestApp:
    admin.put(
        "/admin/v1/droplets/d1", json={"addresses": [D1], "hostname": "web-1", "region": "fra1"}, headers=AUTH
    )
    admin.put("/admin/v1/droplets/d2", json={"addresses": [D2]}, headers=AUTH)
    admin.put(
        "/admin/v1/droplets/d1/maintenance",
        json={
            "id": "ev-1",
            "event": "live_migrate",
            "state": "scheduled",
            "not_before": "2026-12-01T02:00:00Z",
        },
        headers=AUTH,
    )
    guest_app.hub.reload()
    return guest_app
