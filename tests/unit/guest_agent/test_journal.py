"""The journal: durable, atomic, and honest about what a crash interrupted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from guest_agent.config import Phase
from guest_agent.errors import AlreadyRunning, IllegalTransition, JournalError
from guest_agent.journal import HookOutcome, Journal, atomic_write
from guest_agent.states import TRANSITIONS, EventStatus, MigrationKind, check_transition


def _begin(j: Journal, event_id: str = "ev-1") -> None:
    j.begin_event(event_id=event_id, server_id=event_id, kind="live_migrate", deadline=100.0, not_before=90.0)


def test_journal_survives_a_new_process(tmp_path: Path) -> None:
    path = tmp_path / "state" / "journal.json"
    j = Journal.open(path)
    _begin(j)
    j.set_status("ev-1", EventStatus.DRAINING)
    j.hook_started("ev-1", Phase.ON_NOTICE, "a")
    j.hook_finished("ev-1", Phase.ON_NOTICE, "a", HookOutcome.OK, "exit status 0")
    j.hook_started("ev-1", Phase.ON_NOTICE, "b")  # then kill -9
    j.put_data("ev-1", "nested_vms:test", {"running": ["web1"]})

    again = Journal.open(path)
    rec = again.active()
    assert rec is not None
    assert rec.status is EventStatus.DRAINING
    assert rec.deadline == 100.0
    a, b = rec.hook(Phase.ON_NOTICE, "a"), rec.hook(Phase.ON_NOTICE, "b")
    assert a is not None
    assert a.finished
    assert a.outcome is HookOutcome.OK
    assert b is not None
    assert b.interrupted
    assert rec.data == {"nested_vms:test": {"running": ["web1"]}}
    assert not list(path.parent.glob(".*.tmp"))  # no temporary file left behind


def test_journal_terminal_status_clears_the_active_event(tmp_path: Path) -> None:
    j = Journal.open(tmp_path / "j.json")
    _begin(j)
    for s in (EventStatus.DRAINING, EventStatus.DRAINED, EventStatus.RESTORING, EventStatus.DONE):
        j.set_status("ev-1", s)
    assert j.active() is None
    assert [e.status for e in Journal.open(tmp_path / "j.json").events()] == [EventStatus.DONE]


def test_journal_refuses_an_illegal_transition(tmp_path: Path) -> None:
    j = Journal.open(tmp_path / "j.json")
    _begin(j)
    with pytest.raises(IllegalTransition, match="noticed -> powered_off"):
        j.set_status("ev-1", EventStatus.POWERED_OFF)


@pytest.mark.parametrize("current", list(EventStatus))
@pytest.mark.parametrize("new", list(EventStatus))
def test_states_transition_table_is_the_only_authority(current: EventStatus, new: EventStatus) -> None:
    if new in TRANSITIONS[current]:
        check_transition(current, new)
    else:
        with pytest.raises(IllegalTransition):
            check_transition(current, new)


def test_journal_inherits_the_drain_of_a_superseded_event(tmp_path: Path) -> None:
    j = Journal.open(tmp_path / "j.json")
    _begin(j)
    j.hook_started("ev-1", Phase.ON_NOTICE, "drain")
    j.hook_finished("ev-1", Phase.ON_NOTICE, "drain", HookOutcome.OK)
    rec = j.begin_event(
        event_id="ev-2",
        server_id="ev-2",
        kind="offline_migrate",
        deadline=None,
        not_before=None,
        inherit_from="ev-1",
        inherit_phases=(Phase.ON_NOTICE,),
    )
    drain = rec.hook(Phase.ON_NOTICE, "drain")
    assert drain is not None
    assert drain.finished


def test_journal_unreadable_file_is_moved_aside_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / "j.json"
    path.write_text("{not json")
    j = Journal.open(path)
    assert j.active() is None
    assert list(tmp_path.glob("j.json.corrupt-*"))
    (tmp_path / "k.json").write_text("[]")
    with pytest.raises(JournalError):
        Journal.open(tmp_path / "k.json", read_only=True)


def test_journal_reads_an_event_kind_as_the_enum_from_the_stored_value(tmp_path: Path) -> None:
    path = tmp_path / "j.json"
    doc = {"version": 1, "active": None, "events": {}}
    doc["events"] = {  # as any earlier agent wrote it: the bare value
        "ev-1": {
            "server_id": "ev-1", "kind": "offline_migrate", "status": "done", "first_seen": 1.0,
            "deadline": None, "not_before": None, "simulated": False, "history": [["noticed", 1.0]],
            "hooks": {}, "data": {},
        }
    }  # fmt: skip
    path.write_text(json.dumps(doc))
    rec = Journal.open(path).event("ev-1")
    assert rec is not None and rec.kind is MigrationKind.OFFLINE_MIGRATE
    j = Journal.open(path)
    j.begin_event(
        event_id="ev-2", server_id="ev-2", kind=MigrationKind.LIVE_MIGRATE, deadline=None, not_before=None
    )
    assert json.loads(path.read_text())["events"]["ev-2"]["kind"] == "live_migrate"  # the value, unchanged
    assert [e.kind for e in Journal.open(path).events()] == [
        MigrationKind.OFFLINE_MIGRATE,
        MigrationKind.LIVE_MIGRATE,
    ]


def test_journal_refuses_an_unknown_event_kind_and_stays_readable(tmp_path: Path) -> None:
    path = tmp_path / "j.json"
    j = Journal.open(path)
    _begin(j)
    with pytest.raises(ValueError, match="'reboot'"):
        j.begin_event(event_id="ev-2", server_id="ev-2", kind="reboot", deadline=None, not_before=None)  # type: ignore[arg-type]
    again = Journal.open(path)  # not moved aside as unreadable: the bad kind was never written
    assert not list(tmp_path.glob("j.json.corrupt-*"))
    assert [e.event_id for e in again.events()] == ["ev-1"]
    active = again.active()
    assert active is not None and active.event_id == "ev-1"


def test_journal_lock_keeps_a_second_agent_out(tmp_path: Path) -> None:
    first = Journal.open(tmp_path / "j.json")
    first.lock()
    second = Journal.open(tmp_path / "j.json")
    with pytest.raises(AlreadyRunning, match="another guest-agent"):
        second.lock()
    first.unlock()
    second.lock()
    second.unlock()


def test_atomic_write_replaces_whole_content(tmp_path: Path) -> None:
    path = tmp_path / "f.json"
    atomic_write(path, json.dumps({"a": 1}).encode())
    atomic_write(path, json.dumps({"b": 2}).encode())
    assert json.loads(path.read_text()) == {"b": 2}
    assert path.stat().st_mode & 0o777 == 0o600


def test_journal_keeps_a_bounded_history(tmp_path: Path) -> None:
    clock = iter(float(i) for i in range(10_000))
    j = Journal.open(tmp_path / "j.json", wall=lambda: next(clock))
    for i in range(60):
        _begin(j, f"ev-{i}")
        j.set_status(f"ev-{i}", EventStatus.DONE)
    assert len(j.events()) <= 51
    assert j.events()[-1].event_id == "ev-59"
