"""The engine's prediction reaches the guest: ``evacuate --predict`` → notice PUT → guest JSON → SDK.

One real metadata server on loopback serves every host; guests read it from their own 127.0.6.N, as
``curl --interface`` would. An event set the old way (no prediction) still reads exactly as before.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from guest_sdk import EventKind, MaintenanceClient
from host_engine.expectation import predicted
from tests.integration import engine_cli
from tests.integration.engine_cli import add_fleet, cli_ok, engine_for
from tests.servers import MetadataServer, curl
from tests.support import require, require_binary
from tests.unit.host_engine.conftest import FakeClock

ADDR = {"d1": "127.0.6.1", "d2": "127.0.6.2", "d3": "127.0.6.3"}
VISIBLE_WITHIN_S = 5.0


@pytest.fixture
def server(tmp_path: Path) -> Iterator[MetadataServer]:
    require_binary("curl")
    require(Path(sys.executable).parent.joinpath("metadata-server").exists(), "metadata-server not installed")
    with MetadataServer.start(tmp_path / "ms") as ms:
        yield ms


clock = engine_cli.clock


@pytest.fixture
def db(tmp_path: Path, clock: FakeClock, server: MetadataServer) -> str:
    path = str(tmp_path / "engine.db")
    hosts = dict.fromkeys(("hv1", "hv2", "hv3"), server)
    add_fleet(path, clock, hosts, {d: (h, ADDR[d]) for d, h in (("d1", "hv1"), ("d2", "hv1"), ("d3", "hv2"))})
    return path


def guest_json(ms: MetadataServer, droplet: str) -> dict[str, Any]:
    out = curl(ms.guest_url + "/v1/maintenance_event.json", ADDR[droplet])
    assert out.returncode == 0, out.stderr
    doc: dict[str, Any] = json.loads(out.stdout)
    return doc


def test_engine_prediction_reaches_the_guest_json_and_the_sdk(
    db: str, clock: FakeClock, server: MetadataServer
) -> None:
    cli_ok(db, clock, "evacuate", "hv1", "--start", "+60s", "--notice", "30s", "--unsafe-short-notice",
           "--predict")  # fmt: skip
    store, engine = engine_for(db, clock)
    try:
        clock.advance(30)
        notified = engine.tick().notified
        assert sorted(m.droplet_id for m in notified) == ["d1", "d2"]
        for m in store.list_migrations(source_host="hv1"):
            p = predicted(m.stats)
            assert p is not None and p.duration_s > 0
            doc = guest_json(server, m.droplet_id)
            assert doc["event"] == "live_migrate" and doc["id"] == m.event_id
            assert (
                doc["expected_duration_s"] == round(p.duration_s, 1)
                and doc["expected_downtime_ms"] is not None
            )
            assert doc["expected_downtime_ms"] == (None if p.downtime_ms is None else round(p.downtime_ms, 1))
            with MaintenanceClient(server.guest_url, source_address=ADDR[m.droplet_id]) as client:
                ev = client.details()
            assert ev.expected_duration_s == round(p.duration_s, 1)
            assert ev.expected_downtime_ms == doc["expected_downtime_ms"]
        # A reconciliation pass finds the server showing what the store wants: nothing to set again.
        assert not any(r.changed for r in engine.reconcile())
    finally:
        engine.sync.close()
        store.close()


def test_an_event_set_without_a_prediction_reads_as_before(
    db: str, clock: FakeClock, server: MetadataServer
) -> None:
    server.register("d3", [ADDR["d3"]], hostname="d3")
    # What an engine from before predictions sends: id, event, state, not_before and deadline only.
    server.set_event("d3", "ev-old", not_before="2026-12-01T02:00:00Z")
    doc = guest_json(server, "d3")
    assert {k: doc[k] for k in ("event", "id", "state", "not_before", "deadline")} == {
        "event": "live_migrate",
        "id": "ev-old",
        "state": "scheduled",
        "not_before": "2026-12-01T02:00:00Z",
        "deadline": "2026-12-01T02:00:00Z",
    }
    assert doc["expected_downtime_ms"] is None and doc["expected_duration_s"] is None
    with MaintenanceClient(server.guest_url, source_address=ADDR["d3"]) as client:
        ev = client.details()
    assert ev.kind is EventKind.LIVE_MIGRATE and ev.id == "ev-old"
    assert ev.expected_downtime_ms is None and ev.expected_duration_s is None
