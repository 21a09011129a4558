"""Hostile journals: any file that is not a valid version-1 journal is moved aside at start, never a crash.

Before: valid JSON of the wrong shape raised ``AttributeError`` at start (a crash loop under
``Restart=always``), and a ``deadline`` string raised ``TypeError`` at every step.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from guest_agent.config import Phase, parse_config
from guest_agent.daemon import Daemon
from guest_agent.errors import AlreadyRunning, JournalError
from guest_agent.journal import HookOutcome, Journal
from guest_agent.journal_schema import HOOK_OUTCOMES, MAX_JOURNAL_BYTES, check_journal
from guest_agent.states import EventStatus

from .conftest import World, live

GOOD_EVENT: dict[str, Any] = {
    "server_id": "ev-0",
    "kind": "live_migrate",
    "status": "drained",
    "first_seen": 1_800_000_000.0,
    "deadline": 1_800_000_600.0,
    "not_before": 1_800_000_600.0,
    "simulated": False,
    "history": [["noticed", 1_800_000_000.0], ["draining", 1_800_000_001.0], ["drained", 1_800_000_002.0]],
    "hooks": {
        "on_notice/drain": {
            "runs": 1,
            "started_at": 1_800_000_001.0,
            "finished_at": 1_800_000_002.0,
            "outcome": "ok",
            "detail": "exit status 0",
        }
    },
    "data": {"nested_vms:qemu:///system": {"running": ["web1"]}, "shutdown_abandoned": False},
}
GOOD: dict[str, Any] = {"version": 1, "active": "ev-0", "events": {"ev-0": GOOD_EVENT}}


def _with(path: str, value: Any) -> dict[str, Any]:
    """GOOD with the value at a dotted path replaced (``-`` deletes the key)."""
    doc = copy.deepcopy(GOOD)
    *parents, last = path.split(".")
    node: Any = doc
    for part in parents:
        node = node[part]
    if value == "-":
        del node[last]
    else:
        node[last] = value
    return doc


def _deep(levels: int) -> str:
    return '{"version": 1, "active": null, "events": {"e": ' + "[" * levels + "]" * levels + "}}"


HOSTILE: dict[str, str | bytes] = {
    "a list": "[]",
    "a number": "5",
    "null": "null",
    "events is a list": json.dumps({"version": 1, "active": None, "events": []}),
    "version as string": json.dumps(_with("version", "1")),
    "version as bool": json.dumps(_with("version", True)),
    "future version": json.dumps(_with("version", 2)),
    "extra top-level key": json.dumps({**GOOD, "extra": 1}),
    "active names no event": json.dumps(_with("active", "nope")),
    "active is a list": json.dumps(_with("active", ["ev-0"])),
    "active event is done": json.dumps(_with("events.ev-0.status", "done")),
    "deadline is a string": json.dumps(_with("events.ev-0.deadline", "tomorrow")),
    "deadline is NaN": json.dumps(_with("events.ev-0.deadline", float("nan"))),
    "deadline is huge": json.dumps(_with("events.ev-0.deadline", 1e308)),
    "first_seen is a bool": json.dumps(_with("events.ev-0.first_seen", True)),
    "first_seen missing": json.dumps(_with("events.ev-0.first_seen", "-")),
    "kind is an object": json.dumps(_with("events.ev-0.kind", {"a": 1})),
    "status unknown": json.dumps(_with("events.ev-0.status", "exploded")),
    "status is a list": json.dumps(_with("events.ev-0.status", ["drained"])),
    "simulated is a string": json.dumps(_with("events.ev-0.simulated", "no")),
    "history entry wrong": json.dumps(_with("events.ev-0.history", [[1, 2]])),
    "hooks is a list": json.dumps(_with("events.ev-0.hooks", [])),
    "hook key without phase": json.dumps(_with("events.ev-0.hooks", {"drain": {}})),
    "hook outcome unhashable": json.dumps(_with("events.ev-0.hooks.on_notice/drain.outcome", ["ok"])),
    "hook runs negative": json.dumps(_with("events.ev-0.hooks.on_notice/drain.runs", -1)),
    "hook detail a dict": json.dumps(_with("events.ev-0.hooks.on_notice/drain.detail", {})),
    "hook unknown key": json.dumps(_with("events.ev-0.hooks.on_notice/drain.shell", "rm -rf /")),
    "hook process pgid 1": json.dumps(
        _with("events.ev-0.hooks.on_notice/drain.process", {"pgid": 1, "boot_id": "", "start_ticks": 0})
    ),
    "data nested garbage": json.dumps(_with("events.ev-0.data", {"x": [[[{"y": [[[]]]}]]]})),
    "nested vms not names": json.dumps(_with("events.ev-0.data", {"nested_vms:u": {"running": [1, None]}})),
    "data is a string": json.dumps(_with("events.ev-0.data", "abc")),
    "event id too long": json.dumps({"version": 1, "active": None, "events": {"e" * 300: GOOD_EVENT}}),
    "too many events": json.dumps(
        {"version": 1, "active": None, "events": {f"e{i}": GOOD_EVENT for i in range(1001)}}
    ),
    "nested 100k deep": _deep(100_000),
    "larger than the cap": json.dumps(GOOD) + " " * MAX_JOURNAL_BYTES,
    "not UTF-8": b'{"version": 1, "active": null, "events": {"\xff\xfe": 1}}',
    "not JSON": "{not json",
    "empty": "",
}


def _write(path: Path, content: str | bytes) -> None:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())


def test_journal_schema_accepts_what_the_agent_writes(tmp_path: Path) -> None:
    assert check_journal(copy.deepcopy(GOOD)) == GOOD
    j = Journal.open(tmp_path / "j.json")
    j.begin_event(event_id="a", server_id=None, kind="offline_migrate", deadline=None, not_before=None)
    j.put_data("a", "shutdown_abandoned", True)
    j.hook_started("a", Phase.BEFORE_OFFLINE, "@ack-offline")
    j.hook_finished("a", Phase.BEFORE_OFFLINE, "@ack-offline", HookOutcome.OK)
    check_journal(json.loads((tmp_path / "j.json").read_text()))
    assert {o.value for o in HookOutcome} == HOOK_OUTCOMES


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_journal_is_moved_aside_and_the_agent_works(
    name: str, tmp_path: Path, world_factory: Callable[..., World], caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "journal.json"
    _write(path, HOSTILE[name])
    w = world_factory()  # the agent starts on the hostile file (Journal.open, as in the daemon)
    assert list(tmp_path.glob("journal.json.corrupt-*")), "the file is kept aside for a human"
    errors = [r for r in caplog.records if "moved aside" in r.getMessage()]
    assert len(errors) == 1 and "\n" not in errors[0].getMessage()
    assert len(errors[0].getMessage()) < 1000
    assert w.agent.journal.active() is None

    w.agent.handle(live("ev-9", deadline=w.clock.in_s(600)))  # and handles the next event normally
    rec = w.agent.journal.event("ev-9")
    assert rec is not None and rec.status is EventStatus.DRAINED
    assert w.recorder.names() == ["tell-lb", "drain"]


@pytest.mark.parametrize("name", ["events is a list", "deadline is a string", "nested 100k deep"])
def test_hostile_journal_read_only_is_one_clear_error(name: str, tmp_path: Path) -> None:
    path = tmp_path / "journal.json"
    _write(path, HOSTILE[name])
    with pytest.raises(JournalError, match="cannot read the journal") as info:
        Journal.open(path, read_only=True)
    assert "\n" not in str(info.value)
    assert path.exists()  # `status` never moves anything


def test_daemon_takes_the_lock_before_loading(tmp_path: Path) -> None:
    """A second agent must not move aside the journal the running one owns (it may be mid-change)."""
    path = tmp_path / "journal.json"
    config = parse_config(
        f'[metadata]\nurl = "http://127.0.0.1:1"\n[agent]\njournal_path = "{path}"\n'
        'power_off_command = ["/bin/true"]\n',
        environ={},
    )
    first = Journal.open_locked(path)
    _write(path, "{half a document")  # whatever the running agent's file looks like right now
    try:
        with pytest.raises(AlreadyRunning):
            Daemon.open(config, lambda: config)
        assert path.read_text() == "{half a document"
        assert not list(tmp_path.glob("journal.json.corrupt-*"))
    finally:
        first.unlock()
