"""Where the agent learns about events: the guest SDK, behind a small interface the agent owns.

The agent's state machine sees only :class:`Notice` values (or ``None`` = "not known right now"); tests
drive it with notices directly. :class:`SDKSource` adapts ``guest_sdk.MaintenanceClient``; :class:`Watcher`
runs it in a background thread — long-poll, bounded backoff while the service is unreachable, one log line
per outage, never giving up — and hands every change to the main thread through a queue.
"""

from __future__ import annotations

import enum
import logging
import queue
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from guest_agent.config import MetadataConfig
from guest_agent.errors import AckRejected, MetadataUnreachable
from guest_agent.states import MigrationKind
from guest_sdk import (
    AckAction,
    EventConflict,
    EventKind,
    GuestSDKError,
    MaintenanceClient,
    MaintenanceEvent,
    MetadataUnavailable,
    NotOnDroplet,
    NotSupportedByServer,
)

log = logging.getLogger(__name__)

BACKOFF_INITIAL_S = 0.5
# A watch is renewed this often with a fresh client, so a client that fell back to polling (the SDK does so
# when a long-poll is answered at once, as a server shutting down gracefully does) long-polls again.
RENEW_WATCH_S = 300.0


class NoticeKind(enum.Enum):
    NONE = "none"
    LIVE_MIGRATE = "live_migrate"
    OFFLINE_MIGRATE = "offline_migrate"
    OTHER = "other"

    @property
    def migration(self) -> MigrationKind | None:
        """The event the agent handles for this reading; None for no event, or a value it does not know."""
        return _MIGRATION_KINDS.get(self)


_MIGRATION_KINDS = {
    NoticeKind.LIVE_MIGRATE: MigrationKind.LIVE_MIGRATE,
    NoticeKind.OFFLINE_MIGRATE: MigrationKind.OFFLINE_MIGRATE,
}


@dataclass(frozen=True)
class Notice:
    """One reading of the droplet's maintenance event, as the agent needs it."""

    kind: NoticeKind
    raw: str = ""
    id: str | None = None  # None from a text-only server
    state: str | None = None
    not_before: datetime | None = None
    deadline: datetime | None = None
    acknowledged: str | None = None
    expected_downtime_ms: float | None = None  # the server's prediction; None when it gives none
    expected_duration_s: float | None = None

    @property
    def is_event(self) -> bool:
        """A migration the agent acts on (an unknown value is logged and ignored)."""
        return self.kind.migration is not None

    @classmethod
    def from_sdk(cls, ev: MaintenanceEvent) -> Notice:
        kind = {
            EventKind.NONE: NoticeKind.NONE,
            EventKind.LIVE_MIGRATE: NoticeKind.LIVE_MIGRATE,
            EventKind.OFFLINE_MIGRATE: NoticeKind.OFFLINE_MIGRATE,
        }.get(ev.kind, NoticeKind.OTHER)
        return cls(
            kind=kind,
            raw=ev.value,
            id=ev.id,
            state=ev.state,
            not_before=ev.not_before,
            deadline=ev.deadline,
            acknowledged=ev.acknowledged,
            expected_downtime_ms=ev.expected_downtime_ms,
            expected_duration_s=ev.expected_duration_s,
        )


CLEAR = Notice(NoticeKind.NONE)


class EventSource(Protocol):
    def changes(self, stop: threading.Event) -> Iterator[Notice]:
        """The current notice, then every change; raises :class:`MetadataUnreachable`."""
        ...

    def current(self) -> Notice:
        """One reading now; raises :class:`MetadataUnreachable`."""
        ...

    def acknowledge(self, event_id: str, action: AckAction, *, power_on_after: bool) -> None:
        """Raises :class:`AckRejected` (not current / cannot ack) or :class:`MetadataUnreachable`."""
        ...

    def close(self) -> None: ...


class SDKSource:
    """The metadata service through ``guest_sdk``. One client per thread (a session is not thread-safe)."""

    def __init__(self, cfg: MetadataConfig) -> None:
        self._cfg = cfg
        self._lock = threading.Lock()
        self._clients: list[MaintenanceClient] = []

    def _client(self) -> MaintenanceClient:
        client = MaintenanceClient(
            self._cfg.url,
            timeout_s=self._cfg.timeout_s,
            source_address=self._cfg.source_address,
            long_poll_timeout_s=self._cfg.long_poll_s,
            poll_interval_s=self._cfg.poll_interval_s,
        )
        with self._lock:
            self._clients.append(client)
        return client

    def changes(self, stop: threading.Event) -> Iterator[Notice]:
        client = self._client()
        try:
            for ev in client.watch(stop=stop, timeout_s=RENEW_WATCH_S):
                yield Notice.from_sdk(ev)
        except (MetadataUnavailable, NotOnDroplet, GuestSDKError) as e:
            raise MetadataUnreachable(_why(e)) from e
        finally:
            self._forget(client)

    def current(self) -> Notice:
        client = self._client()
        try:
            return Notice.from_sdk(client.details())
        except GuestSDKError as e:
            raise MetadataUnreachable(_why(e)) from e
        finally:
            self._forget(client)

    def acknowledge(self, event_id: str, action: AckAction, *, power_on_after: bool) -> None:
        client = self._client()
        try:
            client.acknowledge(event_id, action, power_on_after=power_on_after)
        except (EventConflict, NotSupportedByServer) as e:
            raise AckRejected(str(e)) from e
        except GuestSDKError as e:
            raise MetadataUnreachable(_why(e)) from e
        finally:
            self._forget(client)

    def _forget(self, client: MaintenanceClient) -> None:
        client.close()
        with self._lock:
            if client in self._clients:
                self._clients.remove(client)

    def close(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.close()


def _why(e: BaseException) -> str:
    if isinstance(e, NotOnDroplet):
        return f"the metadata service does not know this droplet's address ({e})"
    return str(e)


class Backoff:
    """Exponential backoff with full jitter, capped: 0.5 s, 1 s, 2 s, ... up to ``max_s``."""

    def __init__(
        self, max_s: float, *, initial_s: float = BACKOFF_INITIAL_S, rng: random.Random | None = None
    ):
        self._initial_s = initial_s
        self._max_s = max_s
        self._rng = rng or random.Random()  # noqa: S311  jitter, not cryptography
        self._attempt = 0

    def reset(self) -> None:
        self._attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self._max_s, self._initial_s * 2**self._attempt)
        self._attempt = min(self._attempt + 1, 32)
        return self._rng.uniform(ceiling / 2, ceiling)


UNAVAILABLE = None  # what the watcher queues when the service cannot be reached


class Watcher:
    """A daemon thread that follows the event and queues each change (``None`` while unreachable)."""

    def __init__(
        self,
        source: EventSource,
        *,
        max_backoff_s: float,
        on_change: Callable[[Notice | None], None] | None = None,
    ) -> None:
        self.queue: queue.Queue[Notice | None] = queue.Queue()
        self._source = source
        self._backoff = Backoff(max_backoff_s)
        self._stop = threading.Event()
        self._on_change = on_change
        self._thread = threading.Thread(target=self._loop, name="guest-agent-watcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _put(self, notice: Notice | None) -> None:
        self.queue.put(notice)
        if self._on_change is not None:
            self._on_change(notice)

    def _loop(self) -> None:
        outage = False
        while not self._stop.is_set():
            try:
                for notice in self._source.changes(self._stop):
                    if outage:
                        log.warning("metadata service reachable again")
                        outage = False
                    self._backoff.reset()
                    self._put(notice)
                    if self._stop.is_set():
                        return
            except MetadataUnreachable as e:
                if not outage:
                    log.error("metadata service unreachable: %s (retrying with backoff; logged once)", e)
                    outage = True
                    self._put(UNAVAILABLE)
            except Exception:  # a bug must not kill the watcher silently: log it and keep following
                log.exception("unexpected error while following the event; retrying")
            self._stop.wait(self._backoff.next_delay())
