"""A throwaway PostgreSQL server for tests: its own cluster in a temporary directory, on a loopback port.

Debian's PostgreSQL refuses to run as root, so as root the cluster belongs to the ``postgres`` user and every
server command runs through ``runuser -u postgres --``; as anyone else it runs as that user.

A test module takes the server as the fixture :data:`pg_server` (one server per module, so a test may stop and
start it) by naming it at module level, ``pg_server = pg.pg_server``; a conftest whose tests share one server for
the whole run names :data:`session_pg_server` the same way (``pg_server = pg.session_pg_server``). Both skip
with the reason when PostgreSQL is missing, and fail under CI=true. Each test takes a fresh, empty database
with :meth:`PostgresServer.new_database`. Outside pytest (bench) use :func:`postgres_server`::

    with postgres_server() as pg:
        url = pg.new_database()       # postgresql://postgres@127.0.0.1:PORT/test_3
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support import require

PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"
START_TIMEOUT_S = 60


def find_pg_bin() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` with ``initdb`` and ``pg_ctl``, or None."""
    found = [Path(p) for p in glob.glob(PG_BIN_GLOB) if (Path(p) / "initdb").exists()]
    if not found:
        return None
    return max(found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)


def missing_reason() -> str | None:
    """Why a server cannot be started here, or None when it can."""
    if find_pg_bin() is None:
        return (
            "PostgreSQL server binaries not found under /usr/lib/postgresql (run `make system-deps` as root)"
        )
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root but there is no `postgres` user to run the server as"
    with contextlib.suppress(ImportError):
        import psycopg  # noqa: F401

        return None
    return "psycopg is not installed (pip install 'droplet-live-migration[postgres]')"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class PostgresServer:
    bin_dir: Path
    root: Path
    port: int
    user: str = "postgres"
    _counter: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def admin_url(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/postgres"

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """Create an empty database and return its URL (SQLAlchemy adds the psycopg driver via the store)."""
        import psycopg

        name = f"test_{os.getpid()}_{next(self._counter)}"
        with psycopg.connect(
            host="127.0.0.1", port=self.port, user=self.user, dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def _as_server_user(argv: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """Start a fresh cluster (trust auth, loopback only, no fsync), yield it, stop and delete it."""
    bin_dir = find_pg_bin()
    if bin_dir is None:
        raise RuntimeError(missing_reason() or "no PostgreSQL")
    root = Path(tempfile.mkdtemp(prefix="host-engine-pg-"))
    data, sockets, logfile = root / "data", root / "sock", root / "server.log"
    sockets.mkdir()
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        for path in (root, sockets):
            os.chown(path, pw.pw_uid, pw.pw_gid)
    port = _free_port()
    user = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
    server = PostgresServer(bin_dir=bin_dir, root=root, port=port, user=user)
    started = False
    try:
        subprocess.run(
            _as_server_user(
                [
                    str(bin_dir / "initdb"),
                    "-D",
                    str(data),
                    "-A",
                    "trust",
                    "-U",
                    user,
                    "-E",
                    "UTF8",
                    "--no-sync",
                ]
            ),
            check=True,
            capture_output=True,
            timeout=START_TIMEOUT_S,
        )
        options = (
            f"-c listen_addresses=127.0.0.1 -p {port} -k {sockets} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        subprocess.run(
            _as_server_user(
                [
                    str(bin_dir / "pg_ctl"),
                    "-D",
                    str(data),
                    "-l",
                    str(logfile),
                    "-o",
                    options,
                    "-w",
                    "-t",
                    str(START_TIMEOUT_S),
                    "start",
                ]
            ),
            check=True,
            capture_output=True,
            timeout=START_TIMEOUT_S + 10,
        )
        started = True
        yield server
    except subprocess.CalledProcessError as e:
        log_text = logfile.read_text(errors="replace")[-2000:] if logfile.exists() else ""
        raise RuntimeError(
            f"PostgreSQL failed: {e.cmd[-1]}: {e.stderr.decode(errors='replace')[-2000:]}\n{log_text}"
        ) from e
    finally:
        if started:
            subprocess.run(
                _as_server_user([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]),
                check=False,
                capture_output=True,
                timeout=60,
            )
        shutil.rmtree(root, ignore_errors=True)


def _required_server() -> Iterator[PostgresServer]:
    """A running server for the fixtures below: skipped with the reason when PostgreSQL cannot start here,
    failed under CI=true (``tests.support.require``)."""
    reason = missing_reason()
    require(reason is None, reason or "")
    with postgres_server() as server:
        yield server


pg_server = pytest.fixture(_required_server, scope="module", name="pg_server")
"""The test module's own PostgreSQL server (a test may stop and start it): ``pg_server = pg.pg_server``."""

session_pg_server = pytest.fixture(_required_server, scope="session", name="pg_server")
"""One PostgreSQL server for the whole run, for a conftest: ``pg_server = pg.session_pg_server``."""
