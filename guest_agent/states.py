"""The lifecycle of one maintenance event as the agent handles it: one enum, one transition table.

::

    NOTICED ──► DRAINING ──► DRAINED ──────────────► RESTORING ──► DONE
       │                       │  ▲                      ▲
       │                       ▼  │ (shutdown abandoned) │
       │                    SHUTTING_DOWN ──► POWERED_OFF┘
       └──► DONE (cleared before anything ran)
    NOTICED / DRAINED ──► SUPERSEDED (a live event replaced by its offline_migrate successor)

``on_notice`` runs in DRAINING, ``before_offline`` + the ack ``offline`` + the power-off in SHUTTING_DOWN,
``after_migration`` in RESTORING. A status saved in the journal survives a crash; a phase state
(DRAINING, SHUTTING_DOWN, RESTORING) found after a restart means "resume that phase".
"""

from __future__ import annotations

import enum

from guest_agent.errors import IllegalTransition


class MigrationKind(enum.StrEnum):
    """What kind of maintenance event the agent is handling (an event's ``kind`` in the journal holds the
    value, which is also the event's name on the metadata service and ``MAINTENANCE_EVENT`` for hooks)."""

    LIVE_MIGRATE = "live_migrate"
    OFFLINE_MIGRATE = "offline_migrate"


class HookOutcome(enum.Enum):
    """How one hook (or one step of the shutdown path) ended, as the journal records it."""

    OK = "ok"
    FAILED = "failed"
    CUT = "cut"  # ran into its timeout or the event's deadline and was stopped
    SKIPPED = "skipped"  # never started: the deadline had passed, or an earlier hook said stop
    INTERRUPTED = "interrupted"  # a crash interrupted it and it is not idempotent: not re-run

    @property
    def success(self) -> bool:
        return self is HookOutcome.OK


class EventStatus(enum.Enum):
    NOTICED = "noticed"
    DRAINING = "draining"
    DRAINED = "drained"
    SHUTTING_DOWN = "shutting_down"
    POWERED_OFF = "powered_off"
    RESTORING = "restoring"
    DONE = "done"
    SUPERSEDED = "superseded"

    @property
    def terminal(self) -> bool:
        return not TRANSITIONS[self]


TRANSITIONS: dict[EventStatus, frozenset[EventStatus]] = {
    EventStatus.NOTICED: frozenset({EventStatus.DRAINING, EventStatus.DONE, EventStatus.SUPERSEDED}),
    EventStatus.DRAINING: frozenset({EventStatus.DRAINED}),
    EventStatus.DRAINED: frozenset(
        {EventStatus.SHUTTING_DOWN, EventStatus.RESTORING, EventStatus.SUPERSEDED}
    ),
    # -> RESTORING: the event went away before the power-off (the ack was refused as stale);
    # -> DRAINED: a voluntary shutdown (prefer_offline) was abandoned because a hook failed and said stop.
    EventStatus.SHUTTING_DOWN: frozenset(
        {EventStatus.POWERED_OFF, EventStatus.RESTORING, EventStatus.DRAINED}
    ),
    EventStatus.POWERED_OFF: frozenset({EventStatus.RESTORING}),
    EventStatus.RESTORING: frozenset({EventStatus.DONE}),
    EventStatus.DONE: frozenset(),
    EventStatus.SUPERSEDED: frozenset(),
}


def check_transition(current: EventStatus, new: EventStatus) -> None:
    """Raise :class:`IllegalTransition` unless the table allows ``current`` → ``new``."""
    if new not in TRANSITIONS[current]:
        raise IllegalTransition(f"illegal event transition {current.value} -> {new.value}")
