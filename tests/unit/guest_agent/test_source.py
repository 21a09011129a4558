"""The watcher thread: every change queued, an outage queued and logged once, never giving up."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from guest_agent.errors import MetadataUnreachable
from guest_agent.source import CLEAR, Backoff, Notice, NoticeKind, Watcher
from guest_sdk import AckAction, EventKind, MaintenanceEvent

from .conftest import live


class ScriptedSource:
    """Each call of ``changes`` plays the next script: a list of notices, then maybe an outage."""

    def __init__(self, scripts: list[list[Notice] | Exception]) -> None:
        self._scripts = scripts
        self.calls = 0
        self.done = threading.Event()

    def changes(self, stop: threading.Event) -> Iterator[Notice]:
        self.calls += 1
        if not self._scripts:
            self.done.set()
            stop.wait(10)
            return
        script = self._scripts.pop(0)
        if isinstance(script, Exception):
            raise script
        yield from script

    def current(self) -> Notice:
        raise NotImplementedError

    def acknowledge(self, event_id: str, action: AckAction, *, power_on_after: bool) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _drain(q: queue.Queue[Notice | None]) -> list[Notice | None]:
    items = []
    while True:
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            return items


def test_watcher_queues_changes_and_one_marker_per_outage(caplog: pytest.LogCaptureFixture) -> None:
    down = MetadataUnreachable("connection refused")
    source = ScriptedSource([[CLEAR], down, down, down, [live("ev-1")]])
    seen: list[Notice | None] = []
    watcher = Watcher(source, max_backoff_s=0.01, on_change=seen.append)
    with caplog.at_level(logging.INFO, logger="guest_agent.source"):
        watcher.start()
        assert source.done.wait(10)
        watcher.stop()
    assert _drain(watcher.queue) == [CLEAR, None, live("ev-1")]
    assert seen == [CLEAR, None, live("ev-1")]
    messages = [r.getMessage() for r in caplog.records]
    assert sum("unreachable" in m for m in messages) == 1
    assert sum("reachable again" in m for m in messages) == 1


def test_backoff_is_bounded_and_jittered() -> None:
    b = Backoff(max_s=4.0)
    delays = [b.next_delay() for _ in range(20)]
    assert all(0 < d <= 4.0 for d in delays)
    assert delays[0] <= 0.5
    assert max(delays[-5:]) > 1.0
    b.reset()
    assert b.next_delay() <= 0.5


def test_notice_from_sdk_event() -> None:
    when = datetime(2026, 12, 1, 2, 0, tzinfo=UTC)
    ev = MaintenanceEvent(
        kind=EventKind.OFFLINE_MIGRATE, raw="offline_migrate\n", id="ev-9", state="scheduled", deadline=when
    )
    n = Notice.from_sdk(ev)
    assert n.kind is NoticeKind.OFFLINE_MIGRATE
    assert n.raw == "offline_migrate"
    assert n.id == "ev-9"
    assert n.deadline == when
    assert n.is_event
    other = Notice.from_sdk(MaintenanceEvent(kind=EventKind.OTHER, raw="reboot"))
    assert other.kind is NoticeKind.OTHER
    assert not other.is_event
