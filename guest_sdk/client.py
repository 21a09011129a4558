"""``MaintenanceClient``: ask the metadata service whether this droplet is about to be migrated; wait for it.

Works against our metadata server (JSON details, ETags, long-polls, acknowledgements) and against a plain
DigitalOcean-style endpoint that answers only a bare string; which one it talks to is found out on the way,
without configuration (docs/sdk.md, "How the client behaves on the wire").
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

import requests

from guest_sdk.errors import (
    EventConflict,
    GuestSDKError,
    MetadataUnavailable,
    NotOnDroplet,
    NotSupportedByServer,
    ProtocolError,
    RequestRejected,
    WaitTimeout,
)
from guest_sdk.models import AckAction, MaintenanceEvent, normalize_etag
from guest_sdk.retry import (
    DEFAULT_RETRY_BUDGET_S,
    RetryPolicy,
    TransientStatus,
    is_transient_status,
    parse_retry_after,
)
from guest_sdk.transport import NO_PROXIES, Reply, build_session, mount_source_address, read_reply

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "http://169.254.169.254"
DEFAULT_CONNECT_TIMEOUT_S = 2.0
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_POLL_INTERVAL_S = 5.0
DEFAULT_LONG_POLL_S = 60  # the server's own default; it accepts 1-300
MAX_LONG_POLL_S = 300
DEFAULT_LONG_POLL_MARGIN_S = 5.0
DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024
MAX_TIMEOUT_S = 3600.0  # beyond this a "timeout" is a hang (and 1e300 overflows the socket layer)
USER_AGENT = "droplet-live-migration-guest-sdk/0.1"
# An attempt's timeouts are cut to what is left of the caller's deadline, plus this: a long-poll asked to
# hold until the deadline must be able to answer right at it.
DEADLINE_GRACE_S = 1.0
MIN_ATTEMPT_TIMEOUT_S = 0.01

TEXT_PATH = "/v1/maintenance_event"
JSON_PATH = "/v1/maintenance_event.json"
ACK_PATH = "/v1/maintenance_event/ack"
# A long-poll answered early with an unchanged ETag this many times in a row means the server ignores it.
EARLY_ANSWERS_BEFORE_POLLING = 3
EARLY_ANSWER_PAUSE_S = 1.0
# What a server without the JSON API answers for its paths (a plain server: 404; some: 405 or 501).
_NOT_IMPLEMENTED = frozenset({404, 405, 501})


class MaintenanceClient:
    """A client for the droplet's maintenance event; a context manager that owns its ``requests.Session``.

    >>> with MaintenanceClient() as client:                        # doctest: +SKIP
    ...     ev = client.event()
    ...     if ev.scheduled:
    ...         print("migration coming:", ev.kind.value)
    ...     ev = client.wait(timeout_s=3600)                        # blocks until one is scheduled

    Every request has explicit connect and read timeouts (a long-poll's read timeout is the server's wait plus
    ``long_poll_margin_s``), ignores proxies from the environment, follows no redirect and reads at most
    ``max_response_bytes``. Transient failures (connection errors, timeouts, 5xx, 429 with its
    ``Retry-After``) are retried ``retry_attempts`` times in all with jittered exponential backoff, for at
    most ``retry_budget_s`` after the first failure, then raise :class:`MetadataUnavailable`; other 4xx are
    never retried (the policy is :class:`guest_sdk.retry.RetryPolicy`). A call given ``timeout_s`` (``event``,
    ``details``, ``wait``, ...) never runs past it: no retry starts that would, and each attempt's timeouts
    are cut to what is left. ``sleep`` and ``clock`` (monotonic seconds) are injectable so tests need no real
    waiting.

    One client is meant for one thread at a time (``requests.Session`` is not thread-safe); the constructor
    does no I/O.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        source_address: str | None = None,
        session: requests.Session | None = None,
        poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
        long_poll: bool = True,
        long_poll_timeout_s: int = DEFAULT_LONG_POLL_S,
        long_poll_margin_s: float = DEFAULT_LONG_POLL_MARGIN_S,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        retry_attempts: int = 4,
        retry_initial_backoff_s: float = 0.25,
        retry_max_backoff_s: float = 8.0,
        retry_budget_s: float | None = DEFAULT_RETRY_BUDGET_S,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"base_url must be an http(s) URL with a host, not {base_url!r}")
        for name, value in (("timeout_s", timeout_s), ("connect_timeout_s", connect_timeout_s)):
            if not 0 < value <= MAX_TIMEOUT_S:
                raise ValueError(
                    f"{name} must be > 0 and <= {MAX_TIMEOUT_S:g} (a request must end), not {value}"
                )
        if not 0 < poll_interval_s <= MAX_TIMEOUT_S:
            raise ValueError(f"poll_interval_s must be > 0 and <= {MAX_TIMEOUT_S:g}, not {poll_interval_s}")
        if not 0 <= long_poll_margin_s <= MAX_TIMEOUT_S:
            raise ValueError(f"long_poll_margin_s must be 0-{MAX_TIMEOUT_S:g}, not {long_poll_margin_s}")
        if not 1 <= long_poll_timeout_s <= MAX_LONG_POLL_S:
            raise ValueError(f"long_poll_timeout_s must be 1-{MAX_LONG_POLL_S}")
        if max_response_bytes < 1024:
            raise ValueError("max_response_bytes must be >= 1024")
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.poll_interval_s = poll_interval_s
        self.long_poll_timeout_s = long_poll_timeout_s
        self.long_poll_margin_s = long_poll_margin_s
        self.max_response_bytes = max_response_bytes
        self.retry_policy = RetryPolicy(
            retry_attempts, retry_initial_backoff_s, retry_max_backoff_s, budget_s=retry_budget_s
        )
        self._sleep = sleep
        self._clock = clock
        self._owns_session = session is None
        if session is None:
            self._session = build_session(source_address, USER_AGENT)
        else:
            self._session = session
            if source_address is not None:
                mount_source_address(self._session, source_address)
        # What the server turned out to support; None until known. A server that ignores the long-poll
        # parameters (answers at once with the same ETag) switches the client to polling.
        self._json_supported: bool | None = None
        self._long_poll_ok = long_poll
        self._early_answers = 0
        self._last_event: MaintenanceEvent | None = None

    # -- lifecycle ------------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the session if this client created it (a session passed in stays the caller's)."""
        if self._owns_session:
            self._session.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MaintenanceClient({self.base_url!r})"

    # -- what the server supports ----------------------------------------------------------------------

    @property
    def supports_json(self) -> bool | None:
        """True/False once known (after a ``details``/``wait``), else None."""
        return self._json_supported

    @property
    def uses_long_poll(self) -> bool:
        """False once the client found the server cannot long-poll (or was told not to)."""
        return self._long_poll_ok

    @property
    def last_known(self) -> MaintenanceEvent | None:
        """The last event this client read successfully (None before the first)."""
        return self._last_event

    # -- public API -----------------------------------------------------------------------------------

    def event(self, *, timeout_s: float | None = None) -> MaintenanceEvent:
        """The current event from the DigitalOcean-compatible text endpoint: one cheap request.

        ``kind`` and ``raw`` (exactly the body ``curl`` prints) and ``etag`` when the server sends one; the
        other fields are None. Raises :class:`MetadataUnavailable` when the service cannot be reached —
        never a silent "no event" — and at the latest after ``timeout_s`` seconds, retries included (None:
        the retry policy's own bounds).

        >>> MaintenanceClient("http://127.0.0.1:8080").event().kind      # doctest: +SKIP
        <EventKind.NONE: 'none'>
        """
        return self._remember(self._get_text(deadline=self._deadline(timeout_s)))

    def details(self, *, timeout_s: float | None = None) -> MaintenanceEvent:
        """The current event with everything the server says (id, state, not_before, deadline, ack, etag).

        From a text-only server, the same type built from the bare value with the fields it cannot know set
        to None. ``timeout_s`` bounds the call as in :meth:`event`.
        """
        return self._remember(self._get_details(deadline=self._deadline(timeout_s)))

    def wait(self, timeout_s: float | None = None) -> MaintenanceEvent:
        """Block until an event is scheduled and return it (at once if one already is).

        Long-polls when the server supports it, polls every ``poll_interval_s`` otherwise. Raises
        :class:`WaitTimeout` after ``timeout_s`` seconds (None: wait as long as it takes), and
        :class:`MetadataUnavailable` when the service stays unreachable through the retries.

        >>> ev = client.wait(timeout_s=24 * 3600)                       # doctest: +SKIP
        >>> ev.kind, ev.not_before                                       # doctest: +SKIP
        (<EventKind.LIVE_MIGRATE: 'live_migrate'>, datetime.datetime(2026, 12, 1, 2, 0, tzinfo=...))
        """
        return self._wait_for(scheduled=True, timeout_s=timeout_s)

    def wait_until_clear(self, timeout_s: float | None = None) -> MaintenanceEvent:
        """The mirror of :meth:`wait`: block until no event is scheduled, return that (empty) event."""
        return self._wait_for(scheduled=False, timeout_s=timeout_s)

    def watch(
        self, *, timeout_s: float | None = None, stop: threading.Event | None = None
    ) -> Iterator[MaintenanceEvent]:
        """Yield the current event, then every change, each once.

        The iteration ends cleanly when the caller breaks out of the loop (or closes the generator), when
        ``stop`` is set (checked between requests, so within one long-poll), or after ``timeout_s`` seconds.
        A service that stays unreachable ends it with :class:`MetadataUnavailable`.

        >>> for ev in client.watch():                                   # doctest: +SKIP
        ...     print(ev.kind.value or "none")
        """
        deadline = self._deadline(timeout_s)
        current = self._remember(self._get_details(deadline=deadline))
        yield current
        while stop is None or not stop.is_set():
            remaining = None if deadline is None else deadline - self._clock()
            if remaining is not None and remaining <= 0:
                return
            following = self._next_reading(current, remaining, deadline)
            if not following.same_content(current):
                yield following
            current = following

    def acknowledge(
        self, event_id: str, action: AckAction | str, *, power_on_after: bool = True
    ) -> MaintenanceEvent:
        """Tell the service this guest is ``ready`` (the engine may start early) or going ``offline``.

        ``power_on_after`` (offline only) asks the engine to power the droplet on again after the offline
        migration. Returns the updated event. Raises :class:`EventConflict` when ``event_id`` is not the
        current event, :class:`NotSupportedByServer` against a text-only server.

        >>> ev = client.wait()                                          # doctest: +SKIP
        >>> client.acknowledge(ev.id, "ready").acknowledged             # doctest: +SKIP
        'ready'
        """
        try:
            ack = AckAction(action)
        except ValueError as e:
            raise ValueError(f"action must be 'ready' or 'offline', not {action!r}") from e
        if not event_id:
            raise ValueError("event_id must be a non-empty string")
        if self._json_supported is False:
            raise NotSupportedByServer(f"{self.base_url} serves only the text endpoint: cannot acknowledge")
        reply = self._request(
            "POST",
            ACK_PATH,
            json_body={"id": event_id, "action": ack.value, "power_on_after": power_on_after},
        )
        if reply.status in _NOT_IMPLEMENTED:
            self._get_text()  # raises NotOnDroplet when the address is unknown
            self._json_supported = False
            raise NotSupportedByServer(
                f"{self.base_url} has no acknowledgement endpoint (HTTP {reply.status})"
            )
        self._check_status(reply)
        ev = MaintenanceEvent.from_json(
            self._decode_json(reply), etag=normalize_etag(reply.headers.get("ETag"))
        )
        self._json_supported = True
        log.info("acknowledged event_id=%s action=%s power_on_after=%s", event_id, ack.value, power_on_after)
        return self._remember(ev)

    # -- waiting --------------------------------------------------------------------------------------

    def _deadline(self, timeout_s: float | None) -> float | None:
        """``timeout_s`` from now as a value of the clock (None: no deadline)."""
        if timeout_s is None:
            return None
        if math.isnan(timeout_s) or timeout_s < 0:
            raise ValueError(f"timeout_s must be >= 0, not {timeout_s}")
        return self._clock() + timeout_s

    def _wait_for(self, *, scheduled: bool, timeout_s: float | None) -> MaintenanceEvent:
        deadline = self._deadline(timeout_s)
        current = self._remember(self._get_details(deadline=deadline))
        while current.scheduled != scheduled:
            remaining = None if deadline is None else deadline - self._clock()
            if remaining is not None and remaining <= 0:
                what = "an event to be scheduled" if scheduled else "the event to clear"
                raise WaitTimeout(f"gave up waiting for {what} after {timeout_s} s", last_event=current)
            current = self._next_reading(current, remaining, deadline)
        return current

    def _next_reading(
        self, current: MaintenanceEvent, remaining_s: float | None, deadline: float | None
    ) -> MaintenanceEvent:
        """The next reading after ``current``: a long-poll that returns on change, or a poll after a pause."""
        if self._long_poll_ok and current.etag is not None:
            wait_s = self.long_poll_timeout_s
            if remaining_s is not None:
                # Whole seconds, rounded down: only the last long-poll of a wait can overrun it (by < 1 s).
                wait_s = max(1, min(wait_s, math.floor(remaining_s)))
            params = {"wait_for_change": "true", "last_etag": current.etag, "timeout_sec": str(wait_s)}
            started = self._clock()
            following = self._get_details(
                params=params, read_timeout_s=wait_s + self.long_poll_margin_s, deadline=deadline
            )
            if following.etag == current.etag and self._clock() - started < wait_s / 2:
                # Same ETag, answered well before the wait it was asked for. Once, that is a server shutting
                # down gracefully (it answers every held long-poll); again and again, a server that ignores
                # wait_for_change: then poll from now on rather than spin.
                self._early_answers += 1
                if self._early_answers >= EARLY_ANSWERS_BEFORE_POLLING:
                    log.info("%s answers long-polls at once: falling back to polling", self.base_url)
                    self._long_poll_ok = False
                else:
                    self._pause(remaining_s, min(self.poll_interval_s, EARLY_ANSWER_PAUSE_S))
            else:
                self._early_answers = 0
            return self._remember(following)
        self._pause(remaining_s)
        return self._remember(self._get_details(deadline=deadline))

    def _pause(self, remaining_s: float | None, interval_s: float | None = None) -> None:
        pause_s = self.poll_interval_s if interval_s is None else interval_s
        if remaining_s is not None:
            pause_s = max(0.0, min(pause_s, remaining_s))
        if pause_s > 0:
            self._sleep(pause_s)

    # -- endpoints ------------------------------------------------------------------------------------

    def _get_text(
        self,
        *,
        params: dict[str, str] | None = None,
        read_timeout_s: float | None = None,
        deadline: float | None = None,
    ) -> MaintenanceEvent:
        reply = self._request(
            "GET", TEXT_PATH, params=params, read_timeout_s=read_timeout_s, deadline=deadline
        )
        self._check_status(reply)
        return MaintenanceEvent.from_text(reply.text(), etag=normalize_etag(reply.headers.get("ETag")))

    def _get_details(
        self,
        *,
        params: dict[str, str] | None = None,
        read_timeout_s: float | None = None,
        deadline: float | None = None,
    ) -> MaintenanceEvent:
        """JSON details when the server has them, else the text endpoint (deciding which on first use)."""
        if self._json_supported is False:
            return self._get_text(params=params, read_timeout_s=read_timeout_s, deadline=deadline)
        reply = self._request(
            "GET", JSON_PATH, params=params, read_timeout_s=read_timeout_s, deadline=deadline
        )
        if reply.status in _NOT_IMPLEMENTED or (
            reply.status == 200 and reply.content_type != "application/json"
        ):
            # Either a text-only server or an address that is no droplet's: the text endpoint tells which
            # (404 there raises NotOnDroplet). Its answer is the reading we wanted anyway.
            text_event = self._get_text(deadline=deadline)
            if self._json_supported is None:
                log.info(
                    "%s has no JSON endpoint (HTTP %s): using the text endpoint", self.base_url, reply.status
                )
            self._json_supported = False
            return text_event
        self._check_status(reply)
        ev = MaintenanceEvent.from_json(
            self._decode_json(reply), etag=normalize_etag(reply.headers.get("ETag"))
        )
        self._json_supported = True
        return ev

    # -- HTTP -----------------------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        json_body: dict[str, Any] | None = None,
        read_timeout_s: float | None = None,
        deadline: float | None = None,
    ) -> Reply:
        """One logical request with retries; returns any non-transient answer, raises MetadataUnavailable."""
        url = self.base_url + path
        read_s = read_timeout_s if read_timeout_s is not None else self.timeout_s

        def attempt() -> Reply:
            timeout = (self.connect_timeout_s, read_s)
            if deadline is not None:
                left_s = max(MIN_ATTEMPT_TIMEOUT_S, deadline - self._clock() + DEADLINE_GRACE_S)
                timeout = (min(self.connect_timeout_s, left_s), min(read_s, left_s))
            response = self._session.request(
                method,
                url,
                params=params,
                json=json_body,
                timeout=timeout,
                allow_redirects=False,
                stream=True,
                proxies=dict(NO_PROXIES),  # type: ignore[arg-type]  # None removes a proxy: requests' API
            )
            reply = read_reply(response, self.max_response_bytes)
            if is_transient_status(reply.status):
                raise TransientStatus(reply.status, url, parse_retry_after(reply.headers.get("Retry-After")))
            return reply

        retrying = self.retry_policy.retrying(sleep=self._sleep, clock=self._clock, deadline=deadline)
        try:
            return retrying(attempt)
        except TransientStatus as e:
            raise MetadataUnavailable(
                f"{method} {url}: HTTP {e.status} (gave up retrying)", last_known=self._last_event
            ) from e
        except requests.exceptions.SSLError as e:
            raise MetadataUnavailable(f"{method} {url}: TLS error: {e}", last_known=self._last_event) from e
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as e:
            raise MetadataUnavailable(
                f"{method} {url}: {_describe(e)} (gave up retrying)", last_known=self._last_event
            ) from e
        except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError) as e:
            raise MetadataUnavailable(
                f"{method} {url}: connection broken mid-answer (gave up retrying)",
                last_known=self._last_event,
            ) from e
        except requests.exceptions.RequestException as e:
            raise GuestSDKError(f"{method} {url}: {e}") from e

    def _check_status(self, reply: Reply) -> None:
        status = reply.status
        if 200 <= status <= 299:
            return
        if 300 <= status <= 399:
            where = reply.headers.get("Location", "?")
            raise ProtocolError(f"{reply.url}: HTTP {status} redirect to {where!r} not followed")
        code, field, message = _error_fields(reply)
        if status == 404:
            raise NotOnDroplet(
                f"{reply.url}: HTTP 404: this address belongs to no droplet"
                + (f" ({message})" if message else "")
            )
        detail = f"{reply.url}: HTTP {status}" + (f": {message}" if message else "")
        if status == 409:
            raise EventConflict(detail, status=status, code=code, field=field)
        if 400 <= status <= 499:
            raise RequestRejected(detail, status=status, code=code, field=field)
        raise ProtocolError(f"{reply.url}: unexpected HTTP {status}")

    @staticmethod
    def _decode_json(reply: Reply) -> object:
        try:
            return json.loads(reply.text())
        except json.JSONDecodeError as e:
            raise ProtocolError(f"{reply.url}: body is not valid JSON: {e}") from e

    def _remember(self, ev: MaintenanceEvent) -> MaintenanceEvent:
        self._last_event = ev
        return ev


def _error_fields(reply: Reply) -> tuple[str | None, str | None, str | None]:
    """(code, field, message) from an error answer: the JSON error document, or its one text line."""
    text = reply.body.decode("utf-8", errors="replace").strip()
    if reply.content_type == "application/json":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            doc = None
        if isinstance(doc, dict):
            code, field, message = doc.get("error"), doc.get("field"), doc.get("message")
            return (
                code if isinstance(code, str) else None,
                field if isinstance(field, str) else None,
                message if isinstance(message, str) else None,
            )
    first_line = text.splitlines()[0][:200] if text else None
    return None, None, first_line


def _describe(exc: BaseException) -> str:
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return "connect timed out"
    if isinstance(exc, requests.exceptions.ReadTimeout):
        return "read timed out"
    if isinstance(exc, requests.exceptions.Timeout):
        return "timed out"
    return "connection failed"
