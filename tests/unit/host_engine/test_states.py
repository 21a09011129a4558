"""The migration state machine: one table, and anything outside it raises."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from host_engine.errors import IllegalTransition
from host_engine.states import (
    ACTIVE_STATES,
    CANCELLABLE,
    TRANSITIONS,
    Ack,
    GuestEvent,
    LogKind,
    MigrationState,
    can_transition,
    check_transition,
    guest_event,
)

S = MigrationState

# docs/host-engine.md, "The migration state machine", written out again on purpose: the code's table must equal it.
DOCUMENTED_TABLE = {
    ("planned", "notified"),
    ("planned", "cancelled"),
    ("notified", "running"),
    ("notified", "offline_running"),
    ("notified", "cancelled"),
    ("running", "completed"),
    ("running", "failed"),
    ("failed", "notified"),
    ("failed", "offline_required"),
    ("failed", "cancelled"),
    ("offline_required", "offline_running"),
    ("offline_required", "cancelled"),
    ("offline_running", "completed"),
    ("offline_running", "failed"),
}


def test_states_transition_table_matches_design() -> None:
    table = {(a.value, b.value) for a, nxt in TRANSITIONS.items() for b in nxt}
    assert table == DOCUMENTED_TABLE
    assert set(TRANSITIONS) == set(MigrationState)


@given(st.sampled_from(list(S)), st.sampled_from(list(S)))
def test_states_illegal_transition_raises(a: MigrationState, b: MigrationState) -> None:
    if (a.value, b.value) in DOCUMENTED_TABLE:
        check_transition("m-x", a, b)
        assert can_transition(a, b)
    else:
        with pytest.raises(IllegalTransition, match=f"{a.value} -> {b.value}"):
            check_transition("m-x", a, b)


def test_states_terminal_and_active() -> None:
    assert {s for s in S if s.is_terminal} == {S.COMPLETED, S.CANCELLED}
    assert S.COMPLETED not in ACTIVE_STATES
    assert S.FAILED in ACTIVE_STATES
    assert {S.PLANNED, S.NOTIFIED, S.FAILED, S.OFFLINE_REQUIRED} == CANCELLABLE


@pytest.mark.parametrize(
    ("state", "event", "wire_state"),
    [
        (S.PLANNED, GuestEvent.NONE, None),
        (S.NOTIFIED, GuestEvent.LIVE_MIGRATE, "scheduled"),
        (S.RUNNING, GuestEvent.LIVE_MIGRATE, "in_progress"),
        (S.FAILED, GuestEvent.LIVE_MIGRATE, "scheduled"),
        (S.OFFLINE_REQUIRED, GuestEvent.OFFLINE_MIGRATE, "scheduled"),
        (S.OFFLINE_RUNNING, GuestEvent.OFFLINE_MIGRATE, "in_progress"),
        (S.COMPLETED, GuestEvent.NONE, None),
        (S.CANCELLED, GuestEvent.NONE, None),
    ],
)
def test_states_guest_sees(state: MigrationState, event: GuestEvent, wire_state: str | None) -> None:
    assert guest_event(state) == (event, wire_state)


def test_log_kinds_and_acks_are_their_plain_values() -> None:
    """The enums change nothing on disk or on the wire: a StrEnum is its value."""
    assert [k.value for k in LogKind][:2] == ["transition", "progress"]
    assert Ack.READY == "ready" and Ack.OFFLINE == "offline"
    assert LogKind("progress") is LogKind.PROGRESS
