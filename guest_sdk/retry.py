"""When and how long the client retries: transient failures only, exponential backoff with full jitter,
``Retry-After`` honoured. Built from tenacity's composable strategies; the sleep and clock are parameters
so tests never sleep for real."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import requests
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt
from tenacity.stop import stop_base
from tenacity.wait import wait_base, wait_random_exponential

# Statuses worth another try: the server is overloaded or restarting (5xx), or asks us to slow down (429).
# 501 means "this server does not implement that": retrying cannot change it.
_NOT_TRANSIENT_5XX = frozenset({501, 505})


class TransientStatus(Exception):
    """Internal: an answer whose status says "try again" (5xx, 429). Never leaves the client."""

    def __init__(self, status: int, url: str, retry_after_s: float | None) -> None:
        super().__init__(f"{url}: HTTP {status}")
        self.status = status
        self.retry_after_s = retry_after_s


def is_transient_status(status: int) -> bool:
    """True for the statuses the client retries: 429 and 5xx except "not implemented"."""
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
        self._backoff = wait_random_exponential(multiplier=initial_s, max=max_s, min=min(0.05, initial_s))
        self._initial_s = initial_s
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography

    def __call__(self, retry_state: RetryCallState) -> float:
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None else None
        if isinstance(exc, TransientStatus) and exc.retry_after_s is not None:
            return exc.retry_after_s + self._rng.uniform(0, self._initial_s)
        return float(self._backoff(retry_state))


class stop_at_deadline(stop_base):
    """Stop when the next sleep would end past ``deadline`` (a value of ``clock``); never when it is None."""

    def __init__(self, clock: Callable[[], float], deadline: float | None) -> None:
        self._clock = clock
        self._deadline = deadline

    def __call__(self, retry_state: RetryCallState) -> bool:
        if self._deadline is None:
            return False
        return self._clock() + retry_state.upcoming_sleep >= self._deadline


@dataclass(frozen=True)
class RetryPolicy:
    """How many attempts, how long between them. ``attempts`` counts the first try (1 = no retry)."""

    attempts: int = 4
    initial_backoff_s: float = 0.25
    max_backoff_s: float = 8.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be >= 1")
        if self.initial_backoff_s <= 0 or self.max_backoff_s < self.initial_backoff_s:
            raise ValueError("need 0 < initial_backoff_s <= max_backoff_s")

    def retrying(
        self,
        *,
        sleep: Callable[[float], None],
        clock: Callable[[], float],
        deadline: float | None = None,
    ) -> Retrying:
        """A tenacity ``Retrying`` that re-raises the last error once it gives up."""
        return Retrying(
            sleep=sleep,
            stop=stop_after_attempt(self.attempts) | stop_at_deadline(clock, deadline),
            wait=wait_backoff_or_retry_after(self.initial_backoff_s, self.max_backoff_s),
            retry=retry_if_exception(is_transient),
            reraise=True,
        )
