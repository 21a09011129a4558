"""The host engine against real metadata servers on loopback: notices, cancel, restart reconciliation.

Two servers: A serves hv1, B serves hv2 and hv3. Guests are identified by their source address, so the
tests read the flag exactly as a droplet would (``curl --interface ADDRESS``). The engine's clock is a
FakeClock starting at the real time; the CLI gets the same clock.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from host_engine.states import MigrationState
from tests.integration import engine_cli
from tests.integration.engine_cli import add_fleet, cli_ok, engine_for
from tests.servers import MetadataServer, curl
from tests.support import require_binary
from tests.unit.host_engine.conftest import FakeClock

ADDR = {"d1": "127.0.5.1", "d2": "127.0.5.2", "d3": "127.0.5.3"}


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[MetadataServer, MetadataServer]]:
    require_binary("curl")
    with MetadataServer.start(tmp_path / "ms-a") as a, MetadataServer.start(tmp_path / "ms-b") as b:
        yield a, b


clock = engine_cli.clock


@pytest.fixture
def db(tmp_path: Path, clock: FakeClock, servers: tuple[MetadataServer, MetadataServer]) -> str:
    a, b = servers
    path = str(tmp_path / "engine.db")
    hosts = {"hv1": a, "hv2": b, "hv3": b}
    add_fleet(path, clock, hosts, {d: (h, ADDR[d]) for d, h in (("d1", "hv1"), ("d2", "hv1"), ("d3", "hv2"))})
    return path


def guest_reads(ms: MetadataServer, droplet: str) -> bytes:
    out = curl(ms.guest_url + "/v1/maintenance_event", ADDR[droplet])
    assert out.returncode == 0, out.stderr
    return out.stdout


def admin_event(ms: MetadataServer, droplet: str) -> dict[str, Any] | None:
    r = ms.admin("GET", f"/admin/v1/droplets/{droplet}")
    if r.status_code == 404:
        return None
    event: dict[str, Any] | None = r.json()["event"]
    return event if event and event.get("id") else None


def test_engine_evacuate_notifies_exactly_that_hosts_droplets_at_notice_time(
    db: str, clock: FakeClock, servers: tuple[MetadataServer, MetadataServer]
) -> None:
    a, b = servers
    out = cli_ok(db, clock, "evacuate", "hv1", "--start", "+120s", "--notice", "30s", "--unsafe-short-notice",
                 "--json")  # fmt: skip
    moves = {m["droplet"]: m for m in json.loads(out.output)["moves"]}
    assert set(moves) == {"d1", "d2"} and {m["target"] for m in moves.values()} <= {"hv2", "hv3"}
    store, engine = engine_for(db, clock)
    try:
        engine.tick()  # start-up reconciliation registers everyone on their own server
        assert guest_reads(a, "d1") == b"" and guest_reads(a, "d2") == b"" and guest_reads(b, "d3") == b""
        clock.advance(87)  # three seconds before notice_at (start - 30 s)
        assert engine.tick().notified == []
        assert guest_reads(a, "d1") == b""
        clock.advance(1)  # a tick and the delivery allowance before notice_at: the guest gets its full 30 s
        notified = engine.tick().notified
        assert sorted(m.droplet_id for m in notified) == ["d1", "d2"]
        for m in notified:
            assert guest_reads(a, m.droplet_id) == b"live_migrate"
            ev = admin_event(a, m.droplet_id)
            assert ev is not None and ev["id"] == m.event_id and ev["state"] == "scheduled"
            assert ev["not_before"] == moves[m.droplet_id]["not_before"]
        # Only hv1's droplets, only on hv1's server.
        assert guest_reads(b, "d3") == b"" and admin_event(b, "d3") is None
        assert b.admin("GET", "/admin/v1/droplets/d1").status_code == 404
        status = json.loads(cli_ok(db, clock, "status", "--json").output)
        assert {m["state"] for m in status} == {"notified"}

        # cancel clears the flag at once (the CLI pushes the clear itself).
        cli_ok(db, clock, "cancel", "--host", "hv1", "--reason", "postponed")
        assert guest_reads(a, "d1") == b"" and guest_reads(a, "d2") == b""
        assert all(m.event_cleared_at is not None for m in store.list_migrations(source_host="hv1"))
        assert engine.tick().cleared == []  # nothing left to do
    finally:
        engine.sync.close()
        store.close()


def test_engine_restart_reconciles_a_metadata_server_that_lost_its_state(
    db: str, clock: FakeClock, servers: tuple[MetadataServer, MetadataServer]
) -> None:
    a, _b = servers
    cli_ok(db, clock, "evacuate", "hv1", "--start", "+60s", "--notice", "30s", "--unsafe-short-notice")
    store, engine = engine_for(db, clock)
    try:
        clock.advance(30)
        engine.run(max_ticks=1)
        before = {d: admin_event(a, d) for d in ("d1", "d2")}
        assert all(ev is not None for ev in before.values())

        a.wipe_and_restart()  # a new disk: the server knows nothing
        assert a.admin("GET", "/admin/v1/droplets").json()["droplets"] == []
        assert curl(a.guest_url + "/v1/maintenance_event", ADDR["d1"], "-w", "%{http_code}").stdout.endswith(
            b"404"
        )

        # The engine restarts (here through the CLI's `run`), reconciles, and the guests see their flag again.
        cli_ok(db, clock, "run", "--max-ticks", "1")
        for d in ("d1", "d2"):
            assert guest_reads(a, d) == b"live_migrate"
            ev, old = admin_event(a, d), before[d]
            assert ev is not None and old is not None
            assert (ev["id"], ev["event"], ev["not_before"]) == (old["id"], old["event"], old["not_before"])
        assert {m.state for m in store.list_migrations(source_host="hv1")} == {MigrationState.NOTIFIED}

        # kill -9 and restart: the server kept its state itself; reconciliation then changes nothing.
        a.kill9_and_restart()
        reports = engine.reconcile()
        assert not any(r.changed for r in reports) and not any(r.error for r in reports)
    finally:
        engine.sync.close()
        store.close()


def test_engine_notice_waits_for_an_unreachable_server(
    db: str, clock: FakeClock, servers: tuple[MetadataServer, MetadataServer]
) -> None:
    a, _b = servers
    cli_ok(db, clock, "evacuate", "hv1", "--start", "+60s", "--notice", "30s", "--unsafe-short-notice")
    store, engine = engine_for(db, clock)
    try:
        engine.tick()
        a.stop()
        clock.advance(30)
        result = engine.tick()
        assert result.notified == [] and result.errors
        assert {m.state for m in store.list_migrations(source_host="hv1")} == {MigrationState.PLANNED}
        a.launch()
        clock.advance(1)
        assert len(engine.tick().notified) == 2
        assert guest_reads(a, "d1") == b"live_migrate"
    finally:
        engine.sync.close()
        store.close()
