"""The migration state machine (docs/host-engine.md): one enum, one transition table.

Everything that changes a migration's state goes through :func:`check_transition` (the store calls it
inside the transaction that writes the new state), so an illegal change raises instead of being written.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from host_engine.errors import IllegalTransition


class MigrationState(enum.Enum):
    """Engine states of one migration."""

    PLANNED = "planned"
    NOTIFIED = "notified"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    OFFLINE_REQUIRED = "offline_required"
    OFFLINE_RUNNING = "offline_running"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return not TRANSITIONS[self]

    @property
    def is_active(self) -> bool:
        """Not finished: the migration still holds its droplet and counts against its target."""
        return not self.is_terminal


S = MigrationState

#: The only legal transitions. A state absent as a key has no way out.
TRANSITIONS: Mapping[MigrationState, frozenset[MigrationState]] = {
    S.PLANNED: frozenset({S.NOTIFIED, S.CANCELLED}),
    S.NOTIFIED: frozenset({S.RUNNING, S.OFFLINE_RUNNING, S.CANCELLED}),
    S.RUNNING: frozenset({S.COMPLETED, S.FAILED}),
    # failed -> notified is a retry: same event id, new not_before.
    S.FAILED: frozenset({S.NOTIFIED, S.OFFLINE_REQUIRED, S.CANCELLED}),
    S.OFFLINE_REQUIRED: frozenset({S.OFFLINE_RUNNING, S.CANCELLED}),
    S.OFFLINE_RUNNING: frozenset({S.COMPLETED, S.FAILED}),
    S.COMPLETED: frozenset(),
    S.CANCELLED: frozenset(),
}

#: States a migration can be cancelled from (an operator's abort); derived from the table.
CANCELLABLE: frozenset[MigrationState] = frozenset(s for s, nxt in TRANSITIONS.items() if S.CANCELLED in nxt)

#: States that hold a droplet: at most one migration per droplet may be in one of these.
ACTIVE_STATES: frozenset[MigrationState] = frozenset(s for s in MigrationState if s.is_active)


def can_transition(from_state: MigrationState, to_state: MigrationState) -> bool:
    return to_state in TRANSITIONS[from_state]


def check_transition(migration_id: str, from_state: MigrationState, to_state: MigrationState) -> None:
    """Raise :class:`IllegalTransition` unless the table allows ``from_state -> to_state``."""
    if not can_transition(from_state, to_state):
        raise IllegalTransition(migration_id, from_state.value, to_state.value)


class GuestEvent(enum.Enum):
    """What the guest reads from ``/v1/maintenance_event`` (docs/metadata-server.md, "Guest API")."""

    NONE = ""
    LIVE_MIGRATE = "live_migrate"
    OFFLINE_MIGRATE = "offline_migrate"


def guest_event(state: MigrationState, *, in_progress: bool = False) -> tuple[GuestEvent, str | None]:
    """The event the guest must see while a migration is in ``state``, with the admin API ``state`` field.

    ``failed`` shows ``live_migrate`` because a failed migration is either retried or moved to the offline
    path straight away; once ``offline_required``, the guest sees ``offline_migrate`` under a new event id.
    """
    if state in (S.NOTIFIED, S.FAILED):
        return GuestEvent.LIVE_MIGRATE, "scheduled"
    if state is S.RUNNING:
        return GuestEvent.LIVE_MIGRATE, "in_progress"
    if state is S.OFFLINE_REQUIRED:
        return GuestEvent.OFFLINE_MIGRATE, "in_progress" if in_progress else "scheduled"
    if state is S.OFFLINE_RUNNING:
        return GuestEvent.OFFLINE_MIGRATE, "in_progress"
    return GuestEvent.NONE, None


class LogKind(enum.StrEnum):
    """What one line of a migration's history records (the ``migration_log.kind`` column holds the value)."""

    TRANSITION = "transition"  # a state change (from_state/to_state set)
    PROGRESS = "progress"  # a progress snapshot of a running attempt (data: the Progress as plain values)
    CLAIM = "claim"  # a worker claimed the migration
    RELEASE = "release"  # a worker let go of it (shutting down)
    UPDATE = "update"  # a change without a state change
    ACK = "ack"  # the guest acknowledged (ready/offline)
    WAIT = "wait"  # the executor waits (for the guest to shut down, for an operator)
    ALERT = "alert"  # an operator is needed
    ABORT = "abort"  # an operator asked for an abort
    FORCE_COMPLETE = "force_complete"  # an operator asked for the switchover now


class Ack(enum.StrEnum):
    """A guest's acknowledgement of its maintenance event (the ``migrations.ack`` column holds the value)."""

    READY = "ready"  # drained: the migration may start before not_before
    OFFLINE = "offline"  # it will shut down: migrate it offline


class HostState(enum.Enum):
    """A hypervisor's state in the inventory. Only ``active`` hosts receive droplets."""

    ACTIVE = "active"
    MAINTENANCE = "maintenance"
    DOWN = "down"


class PowerState(enum.StrEnum):
    """A droplet's power state as the inventory records it (the ``droplets.power_state`` column holds the
    value): read from its hypervisor by ``host-engine inventory sync``, shown by ``droplet list``."""

    RUNNING = "running"
    PAUSED = "paused"
    SHUT_OFF = "shut_off"
    OTHER = "other"  # a hypervisor state with no place above (libvirt's "no state", "suspended", ...)
