"""The host engine beside real metadata servers, driven in-process as an operator and an engine would.

For the integration tests that run ``host-engine`` commands through click's ``CliRunner`` against real
``tests.servers.MetadataServer`` processes: ``clock`` (a fixture: a ``FakeClock`` starting at the real time, to
the second, so the servers' wall clock and the engine's agree; a module takes it as ``clock = engine_cli.clock``),
``cli_ok`` (one command as user ``ops``, asserted to exit 0), ``add_fleet`` (hosts and droplets added through the
CLI) and ``engine_for`` (the engine's loop on the store, ticked by the test).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import pytest
from click.testing import CliRunner, Result

from host_engine.cli import Deps, cli
from host_engine.config import EngineConfig
from host_engine.engine import Engine
from host_engine.metadata.reconcile import MetadataSync, default_client_factory
from host_engine.store import Store
from tests.unit.host_engine.conftest import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(datetime.now(UTC).replace(microsecond=0))


def cli_ok(db: str, clock: FakeClock, *args: str) -> Result:
    """``host-engine --db DB ARGS`` as user ``ops`` on ``clock`` (its sleep too), asserted to exit 0."""
    r = CliRunner().invoke(
        cli,
        ["--db", db, *args],
        obj=Deps(clock=clock, user="ops", install_signals=False, sleep=clock.sleep),
        catch_exceptions=False,
    )
    assert r.exit_code == 0, (args, r.output, r.stderr)
    return r


def add_fleet(
    db: str, clock: FakeClock, hosts: Mapping[str, Any], droplets: Mapping[str, tuple[str, str]]
) -> None:
    """Add, through the CLI, ``hosts`` (name → the ``MetadataServer`` serving it; 8 vCPUs, 16 GiB, 200 GiB
    each, one datacenter) and ``droplets`` (id → (host, address); 1 vCPU, 1 GiB, 10 GiB each)."""
    for name, ms in hosts.items():
        cli_ok(db, clock, "host", "add", name, "--datacenter", "lo1", "--vcpus", "8", "--memory", "16GiB",
               "--disk", "200GiB", "--metadata-url", ms.admin_url, "--metadata-token-file", str(ms.token_file))  # fmt: skip
    for did, (host, address) in droplets.items():
        cli_ok(db, clock, "droplet", "add", did, "--host", host, "--vcpus", "1", "--memory", "1GiB", "--disk",
               "10GiB", "--address", address)  # fmt: skip


def engine_for(db: str, clock: FakeClock) -> tuple[Store, Engine]:
    """The store at ``db`` and an engine on it (``clock`` its time and sleep, a metadata client that tries three
    times without sleeping); the caller closes ``engine.sync`` and the store."""
    store = Store.open(db, clock=clock)
    sync = MetadataSync(store, default_client_factory(timeout_s=5, attempts=3, sleep=lambda s: None))
    return store, Engine(store, EngineConfig(), sync, clock=clock, sleep=clock.sleep)
