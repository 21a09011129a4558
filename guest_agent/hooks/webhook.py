"""``type = "webhook"``: POST the event JSON to a URL, at least once, with an idempotency key.

Every attempt of one hook for one event carries the same ``Idempotency-Key: <event id>:<phase>:<hook>``
header (also in the body), so the receiver can drop duplicates; the journal makes sure a delivery recorded as
successful is never sent again, even across restarts.

Retried with the project's one retry policy (``guest_sdk.retry``: exponential backoff with jitter, a
``Retry-After`` honoured when sane — clamped to 1-30 s; a negative, ``nan`` or unreadable one means the
default backoff — all within the hook's timeout): connection errors, timeouts, 408, 429 and 5xx.
Not retried: TLS errors, redirects and other 4xx — sending the same
request again will not fix them.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import requests
from tenacity import RetryCallState

from guest_agent.config import Phase, WebhookHookSpec
from guest_agent.hooks.base import HookContext, HookResult, idempotency_key
from guest_sdk.retry import RetryPolicy, parse_retry_after

log = logging.getLogger(__name__)

USER_AGENT = "guest-agent/0.1"
BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 10.0
_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class _Transient(Exception):
    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s  # read by guest_sdk.retry's wait


class _Permanent(Exception):
    pass


class WebhookHook:
    def __init__(self, spec: WebhookHookSpec, *, session: requests.Session | None = None) -> None:
        self.spec = spec
        self._session = session

    def describe(self, phase: Phase) -> str:
        return f"POST {self.spec.url} (up to {self.spec.attempts} attempts within {self.spec.timeout_s:g} s)"

    def run(self, ctx: HookContext, timeout_s: float) -> HookResult:
        key = idempotency_key(ctx.event.event_id, ctx.phase, self.spec.name)
        body = json.dumps(ctx.event.to_json(ctx.phase, self.spec.name)).encode("utf-8")
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "Idempotency-Key": key,
            **dict(self.spec.headers),
        }
        deadline = ctx.monotonic() + timeout_s
        session = self._session or requests.Session()
        attempts = 0

        def attempt() -> int:
            nonlocal attempts
            attempts += 1
            remaining = max(0.01, deadline - ctx.monotonic())
            return self._post(session, body, headers, min(self.spec.request_timeout_s, remaining))

        def log_retry(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.warning(
                "hook %s: delivery attempt %d failed (%s); retrying in %.1f s (event_id=%s)",
                self.spec.name,
                state.attempt_number,
                exc,
                state.upcoming_sleep,
                ctx.event.event_id,
            )

        # The project's one retry policy (guest_sdk.retry); the hook's timeout is the deadline, no budget.
        policy = RetryPolicy(
            attempts=self.spec.attempts,
            initial_backoff_s=BACKOFF_INITIAL_S,
            max_backoff_s=BACKOFF_MAX_S,
            budget_s=None,
        )
        retrying = policy.retrying(
            retry=lambda e: isinstance(e, _Transient),
            sleep=ctx.sleep,
            clock=ctx.monotonic,
            deadline=deadline,
            before_sleep=log_retry,
        )
        try:
            status = retrying(attempt)
        except _Transient as e:
            if attempts < self.spec.attempts:  # stopped by the deadline, not by the number of attempts
                return HookResult.cut(f"not delivered within {timeout_s:g} s ({attempts} attempts): {e}")
            return HookResult.failed(f"not delivered after {attempts} attempts: {e}")
        except _Permanent as e:
            return HookResult.failed(str(e))
        finally:
            if self._session is None:
                session.close()
        return HookResult.ok(f"delivered: HTTP {status} (attempt {attempts}, key {key})")

    def _post(self, session: requests.Session, body: bytes, headers: dict[str, str], timeout_s: float) -> int:
        try:
            resp = session.post(
                self.spec.url, data=body, headers=headers, timeout=timeout_s, allow_redirects=False
            )
        except requests.exceptions.SSLError as e:
            raise _Permanent(f"TLS error: {e}") from e
        except (requests.ConnectionError, requests.Timeout) as e:
            raise _Transient(f"{type(e).__name__}: {_short(e)}") from e
        except requests.RequestException as e:
            raise _Permanent(f"{type(e).__name__}: {_short(e)}") from e
        with resp:
            if 200 <= resp.status_code < 300:
                return resp.status_code
            if resp.status_code in _RETRY_STATUSES:
                retry_after_s = parse_retry_after(resp.headers.get("Retry-After"))
                raise _Transient(f"HTTP {resp.status_code}", retry_after_s)
            raise _Permanent(f"HTTP {resp.status_code} (not retried)")


def _short(exc: Any) -> str:
    text = str(exc)
    return text if len(text) <= 200 else text[:200] + "..."
