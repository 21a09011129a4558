"""Fixtures for the host engine's unit tests: a fake clock, and a store on SQLite or a real PostgreSQL."""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from host_engine.models import Droplet, Host
from host_engine.store import Store
from tests import pg
from tests.unit.host_engine.fake_admin import TOKEN, FakeAdmin, answering

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


pg_server = pg.session_pg_server


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


def add_hosts_served_by(store: Store, servers: Mapping[str, str], token_dir: Path) -> None:
    """Add a host for each ``servers`` item, host name → the admin URL of its metadata server (a
    ``FakeAdmin``), with a token file in ``token_dir`` holding the token the fake accepts."""
    token = token_dir / "token"
    token.write_text(TOKEN)
    for name, url in servers.items():
        store.add_host(make_host(name, metadata_url=url, metadata_token_file=str(token)))


FAKE_ADMIN_URL = "http://127.0.0.1:8111"  # answered by ``responses``: nothing listens there
# The two metadata servers of the ``servers`` fixture (answered by ``responses`` too).
ADMIN_URL_A = "http://127.0.0.1:8101"
ADMIN_URL_B = "http://127.0.0.1:8102"


@pytest.fixture
def admin() -> Iterator[FakeAdmin]:
    """A fake metadata-server admin API (for CLI tests of the executor; test_cli.py has its own)."""
    server = FakeAdmin(FAKE_ADMIN_URL)
    with answering(server):
        yield server


@pytest.fixture
def servers() -> Iterator[tuple[FakeAdmin, FakeAdmin]]:
    """Two fake metadata servers, A at ``ADMIN_URL_A`` and B at ``ADMIN_URL_B``, for the engine's tests of
    fleets that span servers."""
    a, b = FakeAdmin(ADMIN_URL_A), FakeAdmin(ADMIN_URL_B)
    with answering(a, b):
        yield a, b


@pytest.fixture
def db(tmp_path: Path) -> str:
    """An SQLite store: hv1 holds web1 (5 GiB: seconds to copy) and big (204 GiB: minutes); hv2, hv3 empty."""
    path = str(tmp_path / "engine.db")
    store = Store.open(path)
    add_hosts_served_by(store, dict.fromkeys(("hv1", "hv2", "hv3"), FAKE_ADMIN_URL), tmp_path)
    store.add_droplet(make_droplet("web1", "hv1", memory_bytes=1 * GIB, disk_bytes=4 * GIB))
    store.add_droplet(make_droplet("big", "hv1", memory_bytes=4 * GIB, disk_bytes=200 * GIB))
    store.close()
    return path


def wall(clock: FakeClock) -> float:
    """Seconds the fake clock has moved since T0."""
    return (clock.now - T0).total_seconds()
