"""The records the store holds, as frozen dataclasses (what the rest of the engine passes around)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from host_engine.states import HostState, LogKind, MigrationState, PowerState


@dataclass(frozen=True)
class Host:
    """A hypervisor. Capacity is raw (before over-commit ratios)."""

    name: str
    datacenter: str
    vcpus: int
    memory_bytes: int
    disk_bytes: int
    compat_group: str = ""
    state: HostState = HostState.ACTIVE
    hypervisor_uri: str = ""
    metadata_url: str = ""
    metadata_token_file: str = ""
    state_reason: str = ""
    state_changed_by: str = ""
    created_at: datetime | None = None
    updated_at: datetime | None = None


@dataclass(frozen=True)
class Droplet:
    """A VM and the host it runs on (the store's view: switched only when a migration completes)."""

    id: str
    host: str
    vcpus: int
    memory_bytes: int
    disk_bytes: int
    owner_tag: str = ""
    addresses: tuple[str, ...] = ()
    hostname: str = ""
    power_state: PowerState | str = PowerState.RUNNING  # a PowerState, or the raw value a newer engine wrote
    created_at: datetime | None = None
    updated_at: datetime | None = None


@dataclass(frozen=True)
class NewMigration:
    """What the planner asks the store to create (state ``planned``)."""

    droplet_id: str
    source_host: str
    target_host: str
    not_before: datetime
    notice_at: datetime
    deadline: datetime
    reason: str = ""
    requested_by: str = ""
    offline: bool = False
    power_on_after: bool = True
    max_attempts: int = 3
    stats: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Migration:
    """One droplet's move, as stored. ``stats`` holds measurements (downtime_ms, throttle, bytes, ...)."""

    id: str
    droplet_id: str
    source_host: str
    target_host: str
    state: MigrationState
    event_id: str
    not_before: datetime
    notice_at: datetime
    deadline: datetime
    notified_at: datetime | None = None
    attempt: int = 0
    max_attempts: int = 3
    reason: str = ""
    requested_by: str = ""
    offline: bool = False
    power_on_after: bool = True
    ack: str | None = None
    claimed_by: str | None = None
    claimed_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    event_cleared_at: datetime | None = None
    last_error: str | None = None
    stats: Mapping[str, Any] = field(default_factory=dict)
    created_at: datetime | None = None
    updated_at: datetime | None = None


@dataclass(frozen=True)
class LogEntry:
    """One line of a migration's append-only history."""

    id: int
    migration_id: str
    droplet_id: str
    at: datetime
    kind: LogKind | str  # a LogKind, or the raw value a newer engine wrote
    from_state: MigrationState | None
    to_state: MigrationState | None
    message: str
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Usage:
    """Resources committed to a host: droplets on it plus active migrations heading to it."""

    vcpus: int = 0
    memory_bytes: int = 0
    disk_bytes: int = 0
    droplets: int = 0

    def plus(self, vcpus: int, memory_bytes: int, disk_bytes: int) -> Usage:
        return Usage(
            self.vcpus + vcpus,
            self.memory_bytes + memory_bytes,
            self.disk_bytes + disk_bytes,
            self.droplets + 1,
        )
