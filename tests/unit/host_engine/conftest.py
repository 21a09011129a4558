"""Fixtures for the host engine's unit tests: a fake clock, and a store on SQLite or a real PostgreSQL."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from host_engine.models import Droplet, Host
from host_engine.store import Store
from tests import pg
from tests.support import require

T0 = datetime(2026, 12, 1, 0, 0, tzinfo=UTC)
GIB = 1024**3


class FakeClock:
    """A clock the test moves by hand; ``sleep`` advances it instead of sleeping."""

    def __init__(self, start: datetime = T0) -> None:
        self.now = start
        self.slept_s: list[float] = []

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept_s.append(seconds)
        self.advance(seconds)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[pg.PostgresServer]:
    reason = pg.missing_reason()
    require(reason is None, reason or "")
    with pg.postgres_server() as server:
        yield server


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database: a SQLite file, or a new database on the session's PostgreSQL server."""
    if request.param == "sqlite":
        return str(tmp_path / "engine.db")
    server: pg.PostgresServer = request.getfixturevalue("pg_server")
    return server.new_database()


@pytest.fixture
def store(db_url: str, clock: FakeClock) -> Iterator[Store]:
    s = Store.open(db_url, clock=clock)
    yield s
    s.close()


@pytest.fixture
def sqlite_store(tmp_path: Path, clock: FakeClock) -> Iterator[Store]:
    s = Store.open(tmp_path / "engine.db", clock=clock)
    yield s
    s.close()


def make_host(name: str, **kw: object) -> Host:
    fields: dict[str, object] = {
        "datacenter": "nyc1",
        "vcpus": 32,
        "memory_bytes": 128 * GIB,
        "disk_bytes": 2000 * GIB,
        "compat_group": "epyc-qemu7",
        "metadata_url": "http://127.0.0.1:9/",
    }
    fields.update(kw)
    return Host(name=name, **fields)  # type: ignore[arg-type]


def make_droplet(droplet_id: str, host: str, **kw: object) -> Droplet:
    fields: dict[str, object] = {
        "vcpus": 2,
        "memory_bytes": 4 * GIB,
        "disk_bytes": 80 * GIB,
        "addresses": (f"10.0.{zlib.crc32(droplet_id.encode()) % 250}.{len(droplet_id) % 250 + 1}",),
    }
    fields.update(kw)
    return Droplet(id=droplet_id, host=host, **fields)  # type: ignore[arg-type]
