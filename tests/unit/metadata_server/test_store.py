"""The metadata server's state file: durability rules, schema versioning, ETag stability."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from metadata_server.errors import ConfigError, Conflict, NotFound
from metadata_server.hub import Hub
from metadata_server.model import AckAction, DropletView, EventKind, EventState
from metadata_server.store import SCHEMA_VERSION, Store

NOW = "2026-11-26T00:00:00Z"


def test_store_survives_reopen_with_identical_etags(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    store.put_droplet("d1", ["10.0.0.1"], "web", None)
    store.set_event(
        "d1", "ev", EventKind.LIVE_MIGRATE, EventState.SCHEDULED, "2026-12-01T00:00:00Z", None, NOW
    )
    store.acknowledge("d1", "ev", AckAction.READY, False, NOW)
    before = DropletView.of(store.get("d1"))
    store.close()
    after = DropletView.of(Store(tmp_path / "s.db").get("d1"))
    assert (after.etag, after.json_body) == (before.etag, before.json_body)


def test_store_new_event_id_drops_ack_same_id_keeps_it(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    store.put_droplet("d1", ["10.0.0.1"], None, None)
    store.set_event("d1", "a", EventKind.LIVE_MIGRATE, EventState.SCHEDULED, None, None, NOW)
    store.acknowledge("d1", "a", AckAction.OFFLINE, True, NOW)
    d, created = store.set_event(
        "d1", "a", EventKind.LIVE_MIGRATE, EventState.IN_PROGRESS, None, None, "later"
    )
    assert not created
    assert d.event is not None and d.event.ack is not None and d.event.notified_at == NOW
    d, created = store.set_event(
        "d1", "b", EventKind.OFFLINE_MIGRATE, EventState.SCHEDULED, None, None, "later"
    )
    assert created
    assert d.event is not None and d.event.ack is None and d.event.notified_at == "later"
    with pytest.raises(Conflict):
        store.acknowledge("d1", "a", AckAction.READY, True, NOW)
    with pytest.raises(NotFound):
        store.set_event("nope", "a", EventKind.LIVE_MIGRATE, EventState.SCHEDULED, None, None, NOW)


def test_store_refuses_a_newer_schema_and_garbage(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    Store(path).close()
    with sqlite3.connect(path) as c:
        c.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(ConfigError, match="newer than this server"):
        Store(path)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"\x00garbage" * 512)
    with pytest.raises(ConfigError, match="cannot open state file"):
        Store(junk)


def test_hub_wakes_only_the_droplet_that_changed(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    for n in (1, 2):
        store.put_droplet(f"d{n}", [f"10.0.0.{n}"], None, None)
    hub = Hub(store)
    e1, e2 = (hub.view_for_id(f"d{n}").etag for n in (1, 2))  # type: ignore[union-attr]
    results: dict[str, str | None] = {}

    def wait(droplet_id: str, etag: str) -> None:
        view = hub.wait_for_change(droplet_id, etag, timeout_s=3)
        results[droplet_id] = view.text_body.decode() if view else None

    threads = [threading.Thread(target=wait, args=a) for a in (("d1", e1), ("d2", e2))]
    for t in threads:
        t.start()
    # Another process's write, then the watcher's reload:
    Store(tmp_path / "s.db").set_event(
        "d1", "ev", EventKind.LIVE_MIGRATE, EventState.SCHEDULED, None, None, NOW
    )
    hub.reload()
    threads[0].join(2)
    assert results == {"d1": "live_migrate"}  # d2 still waiting
    hub.shutdown()
    threads[1].join(2)
    assert results["d2"] == ""
