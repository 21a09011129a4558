"""One retry policy and one ``Retry-After`` parser, shared by everything in the project that speaks HTTP.

The SDK's client, the guest agent's webhooks and the host engine's admin client all retry the same way
(``guest_sdk`` is the one package every other installs, so this module lives here and is public):

* only **transient** failures are retried (the caller says which; :func:`is_transient` is the SDK's rule);
* between attempts: **full-jitter exponential backoff**, or the server's **``Retry-After``** when it sent a
  usable one (plus a little jitter, so many clients told "30" do not return in the same millisecond);
* a ``Retry-After`` is read by :func:`parse_retry_after`: delta-seconds or an HTTP-date, **clamped** to
  [:data:`RETRY_AFTER_MIN_S`, :data:`RETRY_AFTER_MAX_S`]; a negative, ``nan``, infinite or unreadable value
  counts as not sent (the default backoff applies — never "no wait at all", never "wait forever");
* three bounds on the whole thing, whichever comes first: ``attempts`` (counting the first), an optional
  ``deadline`` of the caller's (a hook's timeout, a ``wait(timeout_s=...)``), and the policy's ``budget_s``:
  retries stop ``budget_s`` seconds after the first failure. An attempt is never started when the sleep
  before it would end past the deadline or the budget.

>>> parse_retry_after("3"), parse_retry_after("-1"), parse_retry_after("nan"), parse_retry_after("99999")
(3.0, None, None, 30.0)
>>> policy = RetryPolicy(attempts=5, initial_backoff_s=0.5, max_backoff_s=10.0, budget_s=60.0)
>>> policy.retrying(retry=lambda e: isinstance(e, ConnectionError))(lambda: "ok")   # tenacity's Retrying
'ok'

Sleeps and clocks are parameters, so tests never sleep for real.
"""

from __future__ import annotations

import email.utils
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from typing import Any

import requests
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt
from tenacity.stop import stop_base
from tenacity.wait import wait_base, wait_random_exponential

__all__ = [
    "DEFAULT_RETRY_BUDGET_S",
    "RETRY_AFTER_MAX_S",
    "RETRY_AFTER_MIN_S",
    "RetryPolicy",
    "TransientStatus",
    "is_transient",
    "is_transient_status",
    "parse_retry_after",
    "retry_after_hint",
]

# A server may ask for anything in Retry-After; what we honour. Below the minimum is a busy loop against an
# overloaded server; above the maximum, a client that looks hung (a caller with a longer deadline retries
# again after the maximum, and a caller with a shorter one gives up instead of sleeping past it).
RETRY_AFTER_MIN_S = 1.0
RETRY_AFTER_MAX_S = 30.0
# How long retries of one call may go on after its first failure, unless the caller's deadline is sooner.
DEFAULT_RETRY_BUDGET_S = 60.0
_MIN_BACKOFF_S = 0.05  # the floor of a jittered backoff

# Statuses worth another try: the server is overloaded or restarting (5xx), or asks us to slow down (429).
# 501 means "this server does not implement that": retrying cannot change it.
_NOT_TRANSIENT_5XX = frozenset({501, 505})


def parse_retry_after(
    value: str | None,
    *,
    now_epoch_s: float | None = None,
    min_s: float = RETRY_AFTER_MIN_S,
    max_s: float = RETRY_AFTER_MAX_S,
) -> float | None:
    """Seconds to wait from a ``Retry-After`` header value, clamped to [``min_s``, ``max_s``]; else None.

    Delta-seconds (``"120"``; a decimal is accepted too) or an HTTP-date (``"Wed, 21 Oct 2015 07:28:00 GMT"``,
    measured against ``now_epoch_s``, default the wall clock; a date in the past means ``min_s``). A missing,
    empty, negative, ``nan``, infinite or unreadable value gives ``None``: the caller's own backoff applies.

    >>> parse_retry_after("120"), parse_retry_after("0"), parse_retry_after("soon"), parse_retry_after(None)
    (30.0, 1.0, None, None)
    >>> parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now_epoch_s=1445412480.0)
    10.0
    """
    if value is None:
        return None
    text = value.strip()
    if not text or len(text) > 64:  # nothing legitimate is longer; do not feed megabytes to a date parser
        return None
    seconds: float
    try:
        seconds = float(text)
    except ValueError:
        seconds = _seconds_until_http_date(text, now_epoch_s)
    if math.isnan(seconds) or seconds < 0 or math.isinf(seconds):
        return None
    return min(max(seconds, min_s), max_s)


def _seconds_until_http_date(text: str, now_epoch_s: float | None) -> float:
    """Seconds from now until an HTTP-date (negative when past); nan when ``text`` is not a date."""
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return math.nan
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    now = time.time() if now_epoch_s is None else now_epoch_s
    return max(when.timestamp() - now, 0.0)  # a date already past: "now", i.e. the minimum


def retry_after_hint(exc: BaseException | None) -> float | None:
    """The ``retry_after_s`` an exception carries (seconds, already parsed and clamped), if any.

    Any exception class can take part: give it a ``retry_after_s: float | None`` attribute set from
    :func:`parse_retry_after` (as :class:`TransientStatus` does).
    """
    hint: Any = getattr(exc, "retry_after_s", None)
    if isinstance(hint, int | float) and not isinstance(hint, bool) and math.isfinite(hint) and hint >= 0:
        return float(hint)
    return None


class TransientStatus(Exception):
    """An HTTP answer whose status says "try again" (5xx, 429), with the server's ``Retry-After`` parsed."""

    def __init__(self, status: int, url: str, retry_after_s: float | None) -> None:
        super().__init__(f"{url}: HTTP {status}")
        self.status = status
        self.retry_after_s = retry_after_s


def is_transient_status(status: int) -> bool:
    """True for the statuses worth retrying: 429 and 5xx except "not implemented"."""
    return status == 429 or (500 <= status <= 599 and status not in _NOT_TRANSIENT_5XX)


def is_transient(exc: BaseException) -> bool:
    """True when another attempt may succeed: a retryable status, a lost or refused connection, a timeout.

    TLS errors are not transient (a certificate will not fix itself between attempts), nor is anything
    that says the request itself was wrong.
    """
    if isinstance(exc, TransientStatus):
        return True
    if isinstance(exc, requests.exceptions.SSLError):
        return False
    return isinstance(
        exc,
        (
            requests.exceptions.ConnectionError,  # refused, reset, DNS, and Connect/ReadTimeout's parent
            requests.exceptions.Timeout,
            requests.exceptions.ChunkedEncodingError,  # the server closed mid-body
            requests.exceptions.ContentDecodingError,
        ),
    )


class wait_backoff_or_retry_after(wait_base):
    """Full-jitter exponential backoff, or the server's ``Retry-After`` plus a little jitter when sent."""

    def __init__(self, initial_s: float, max_s: float, rng: random.Random | None = None) -> None:
        self._backoff = wait_random_exponential(
            multiplier=initial_s, max=max_s, min=min(_MIN_BACKOFF_S, initial_s)
        )
        self._initial_s = initial_s
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography

    def __call__(self, retry_state: RetryCallState) -> float:
        outcome = retry_state.outcome
        hint = retry_after_hint(outcome.exception() if outcome is not None else None)
        if hint is not None:
            return hint + self._rng.uniform(0, self._initial_s)
        return float(self._backoff(retry_state))


class stop_at_deadline(stop_base):
    """Stop when the next sleep would end at or past the deadline (a value of ``clock``).

    The deadline is the caller's (None: none) or ``budget_s`` after the first failure, whichever is sooner.
    One instance serves one call: it remembers when that call first failed.
    """

    def __init__(self, clock: Callable[[], float], deadline: float | None, budget_s: float | None) -> None:
        self._clock = clock
        self._deadline = deadline
        self._budget_s = budget_s
        self._budget_end: float | None = None

    def __call__(self, retry_state: RetryCallState) -> bool:
        now = self._clock()
        if self._budget_s is not None and self._budget_end is None:
            self._budget_end = now + self._budget_s  # called first right after the first failure
        ends = [d for d in (self._deadline, self._budget_end) if d is not None]
        return bool(ends) and now + retry_state.upcoming_sleep >= min(ends)


@dataclass(frozen=True)
class RetryPolicy:
    """How many attempts (counting the first), how long between them, and the time budget of the retries.

    ``budget_s`` (None: no budget) bounds how long retries of one call go on after its first failure; a
    caller's own deadline passed to :meth:`retrying` bounds it too.
    """

    attempts: int = 4
    initial_backoff_s: float = 0.25
    max_backoff_s: float = 8.0
    budget_s: float | None = DEFAULT_RETRY_BUDGET_S

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be >= 1")
        if not 0 < self.initial_backoff_s <= self.max_backoff_s or not math.isfinite(self.max_backoff_s):
            raise ValueError("need 0 < initial_backoff_s <= max_backoff_s (finite)")
        if self.budget_s is not None and not 0 <= self.budget_s < math.inf:
            raise ValueError("budget_s must be >= 0 and finite, or None")

    def retrying(
        self,
        *,
        retry: Callable[[BaseException], bool] = is_transient,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        deadline: float | None = None,
        before_sleep: Callable[[RetryCallState], None] | None = None,
    ) -> Retrying:
        """A tenacity ``Retrying`` for one call: retries what ``retry`` says is transient, then re-raises
        the last error. ``deadline`` is a value of ``clock``; build a new one per call (it keeps state)."""
        return Retrying(
            sleep=sleep,
            stop=stop_after_attempt(self.attempts) | stop_at_deadline(clock, deadline, self.budget_s),
            wait=wait_backoff_or_retry_after(self.initial_backoff_s, self.max_backoff_s),
            retry=retry_if_exception(retry),
            before_sleep=before_sleep,
            reraise=True,
        )
