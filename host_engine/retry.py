"""What to do after a failed live-migration attempt: retry (where, when) or give up to the offline path.

Pure, like the controller: ``after_failure(...) -> RetryDecision``. The executor applies it
(``failed -> notified`` with a new ``not_before``, possibly a new target; or ``failed -> offline_required``).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

# Three live attempts, then offline: one retry covers a transient (a link flap,
# a crashed target replaced by another), a second covers a guest whose load spiked; a third failure says the
# guest will not converge live at all.
DEFAULT_MAX_ATTEMPTS = 3
# A guest that twice failed to converge (stalled / timed out, the controller's throttle already at its cap)
# goes offline at once: the same guest at the same rates will not converge a third time.
DEFAULT_MAX_NONCONVERGING = 2
# Back off 2 min, then 4, 8 ... capped at 30 min, +-20 % jitter so retries of one evacuation spread out.
# The guest keeps reading live_migrate meanwhile; its drain hooks already ran.
DEFAULT_BACKOFF_S = 120.0
DEFAULT_BACKOFF_MAX_S = 1800.0
DEFAULT_JITTER = 0.2
# ``migrate --now``: an operator watches the command and wants the retry now, not in minutes. 5 s lets the
# failed attempt's clean-up settle (a libvirt job torn down, a target's daemon restarting) and still spreads
# concurrent retries; doubling to at most 30 s keeps a third attempt within a minute of the first failure.
NOW_BACKOFF_S = 5.0
NOW_BACKOFF_MAX_S = 30.0
# Offline migration: the guest reads offline_migrate and gets this long to shut itself down (the
# ten-minute notice applies to every event the guest must act on).
DEFAULT_OFFLINE_NOTICE_S = 600.0

NONCONVERGING_REASONS = frozenset({"stalled", "timeout", "not_converging"})


@dataclass(frozen=True)
class RetryConfig:
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    max_nonconverging: int = DEFAULT_MAX_NONCONVERGING
    backoff_s: float = DEFAULT_BACKOFF_S
    backoff_max_s: float = DEFAULT_BACKOFF_MAX_S
    jitter: float = DEFAULT_JITTER
    offline_notice_s: float = DEFAULT_OFFLINE_NOTICE_S

    @classmethod
    def right_away(cls) -> RetryConfig:
        """The retries of ``migrate --now``: seconds apart (5 s, 10 s, ... at most 30 s, jittered), with the
        same attempt limits, convergence rule and choice of another target as every retry.

        >>> from dataclasses import replace
        >>> [backoff_s(n, replace(RetryConfig.right_away(), jitter=0.0)) for n in (1, 2, 3, 9)]
        [5.0, 10.0, 20.0, 30.0]
        """
        return cls(backoff_s=NOW_BACKOFF_S, backoff_max_s=NOW_BACKOFF_MAX_S)


@dataclass(frozen=True)
class RetryDecision:
    offline: bool  # give up live migration: offline_required
    other_target: bool  # pick another target (the failed one was at fault)
    delay_s: float  # new not_before = now + delay_s
    reason: str


def backoff_s(attempt: int, config: RetryConfig, rand: Callable[[], float] = random.random) -> float:
    """Delay before attempt ``attempt + 1``.

    >>> cfg = RetryConfig(jitter=0.0)
    >>> [backoff_s(n, cfg) for n in (1, 2, 3, 10)]
    [120.0, 240.0, 480.0, 1800.0]
    >>> 96.0 <= backoff_s(1, RetryConfig()) <= 144.0
    True
    """
    base = min(config.backoff_max_s, config.backoff_s * 2.0 ** max(0, attempt - 1))
    return base * (1.0 + config.jitter * (2.0 * rand() - 1.0))


def after_failure(
    *,
    attempt: int,
    max_attempts: int,
    target_at_fault: bool,
    abort_reason: str | None,
    nonconverging_attempts: int,
    config: RetryConfig,
    rand: Callable[[], float] = random.random,
) -> RetryDecision:
    """Decide after attempt number ``attempt`` (1-based) failed.

    ``nonconverging_attempts`` counts the failed attempts so far, this one included, that ended because the
    guest did not converge.

    >>> cfg = RetryConfig(jitter=0.0)
    >>> after_failure(attempt=1, max_attempts=3, target_at_fault=True, abort_reason=None,
    ...               nonconverging_attempts=0, config=cfg)
    RetryDecision(offline=False, other_target=True, delay_s=120.0, reason='target at fault: retry elsewhere')
    >>> after_failure(attempt=3, max_attempts=3, target_at_fault=False, abort_reason="no_transfer",
    ...               nonconverging_attempts=0, config=cfg).offline
    True
    >>> after_failure(attempt=2, max_attempts=3, target_at_fault=False, abort_reason="stalled",
    ...               nonconverging_attempts=2, config=cfg).reason
    'did not converge twice: offline'
    """
    if nonconverging_attempts >= config.max_nonconverging:
        return RetryDecision(
            True,
            False,
            config.offline_notice_s,
            f"did not converge {_times(nonconverging_attempts)}: offline",
        )
    if attempt >= max_attempts:
        return RetryDecision(True, False, config.offline_notice_s, f"{attempt} attempts failed: offline")
    delay = backoff_s(attempt, config, rand)
    if target_at_fault:
        return RetryDecision(False, True, delay, "target at fault: retry elsewhere")
    return RetryDecision(False, False, delay, f"attempt {attempt} failed ({abort_reason or 'error'}): retry")


def _times(n: int) -> str:
    return {1: "once", 2: "twice"}.get(n, f"{n} times")
