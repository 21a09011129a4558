"""Fixtures for the guest SDK unit tests: a fake clock whose sleep advances it, and clients wired to it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
import responses

from guest_sdk import MaintenanceClient

BASE = "http://169.254.169.254"
TEXT_URL = BASE + "/v1/maintenance_event"
JSON_URL = BASE + "/v1/maintenance_event.json"
ACK_URL = BASE + "/v1/maintenance_event/ack"


@dataclass
class FakeClock:
    """Monotonic seconds that move only when the code under test sleeps (or a fake server holds)."""

    now: float = 1000.0
    sleeps: list[float] = field(default_factory=list)

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def fake_clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def http() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


@pytest.fixture
def make_client(fake_clock: FakeClock) -> Iterator[Callable[..., MaintenanceClient]]:
    made: list[MaintenanceClient] = []

    def make(**kwargs: object) -> MaintenanceClient:
        kwargs.setdefault("sleep", fake_clock.sleep)
        kwargs.setdefault("clock", fake_clock.clock)
        client = MaintenanceClient(BASE, **kwargs)  # type: ignore[arg-type]
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def event_json(
    event: str = "live_migrate",
    *,
    id: str | None = "ev-1",
    state: str | None = "scheduled",
    etag: str = "e1",
    acknowledged: str | None = None,
    not_before: str | None = "2026-12-01T02:00:00Z",
) -> dict[str, object]:
    """A maintenance_event.json document as our server sends it (docs/metadata-server.md, "Guest API")."""
    if event == "":
        return {
            "event": "",
            "id": None,
            "state": None,
            "not_before": None,
            "notified_at": None,
            "deadline": None,
            "acknowledged": None,
            "etag": etag,
        }
    return {
        "event": event,
        "id": id,
        "state": state,
        "not_before": not_before,
        "notified_at": "2026-12-01T01:50:00Z",
        "deadline": not_before,
        "acknowledged": acknowledged,
        "etag": etag,
    }
