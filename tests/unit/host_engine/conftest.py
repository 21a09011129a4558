"""Fixtures for the host engine's unit tests: a fake clock, and a store on SQLite or a real PostgreSQL."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import responses

from host_engine.models import Droplet, Host
from host_engine.store import Store
from tests import pg
from tests.support import require
from tests.unit.host_engine.fake_admin import FakeAdmin

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


FAKE_ADMIN_URL = "http://127.0.0.1:8111"  # answered by ``responses``: nothing listens there


@pytest.fixture
def admin() -> Iterator[FakeAdmin]:
    """A fake metadata-server admin API (for CLI tests of the executor; test_cli.py has its own)."""
    server = FakeAdmin(FAKE_ADMIN_URL)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        server.install(rsps)
        yield server


@pytest.fixture
def db(tmp_path: Path) -> str:
    """An SQLite store: hv1 holds web1 (5 GiB: seconds to copy) and big (204 GiB: minutes); hv2, hv3 empty."""
    path = str(tmp_path / "engine.db")
    token = tmp_path / "token"
    token.write_text("s3cret")
    store = Store.open(path)
    for name in ("hv1", "hv2", "hv3"):
        store.add_host(make_host(name, metadata_url=FAKE_ADMIN_URL, metadata_token_file=str(token)))
    store.add_droplet(make_droplet("web1", "hv1", memory_bytes=1 * GIB, disk_bytes=4 * GIB))
    store.add_droplet(make_droplet("big", "hv1", memory_bytes=4 * GIB, disk_bytes=200 * GIB))
    store.close()
    return path


def wall(clock: FakeClock) -> float:
    """Seconds the fake clock has moved since T0."""
    return (clock.now - T0).total_seconds()
