"""What to do after a failed live-migration attempt: retry (where, when) or give up to the offline path.

Pure, like the controller: ``after_failure(...) -> RetryDecision``. The executor applies it
(``failed -> notified`` with a new ``not_before``, possibly a new target; or ``failed -> offline_required``).
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

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


class CounterKey(enum.StrEnum):
    """Where ``RetryCounters`` lives in ``migrations.stats`` (the stored JSON has always used these names)."""

    NONCONVERGING_ATTEMPTS = "nonconverging_attempts"
    OFFLINE_ATTEMPTS = "offline_attempts"
    FAILED_TARGETS = "failed_targets"


@dataclass(frozen=True)
class RetryCounters:
    """What the retry path counts across a migration's attempts: the failed attempts that did not converge
    (two send it offline), the failed offline copies (too many need an operator), and the targets that were
    at fault (a retry avoids them). Kept in ``migrations.stats`` under ``CounterKey``.

    >>> c = RetryCounters.from_stats({"nonconverging_attempts": 1, "failed_targets": ["hv2"]})
    >>> c.after(nonconverging=True, offline=False, failed_target="hv3").to_stats()
    {'nonconverging_attempts': 2, 'offline_attempts': 0, 'failed_targets': ['hv2', 'hv3']}
    """

    nonconverging_attempts: int = 0
    offline_attempts: int = 0
    failed_targets: frozenset[str] = frozenset()

    @classmethod
    def from_stats(cls, stats: Mapping[str, Any]) -> RetryCounters:
        """Read from a migration's stats, whatever wrote them: a missing or unreadable value is none."""
        targets = stats.get(CounterKey.FAILED_TARGETS)
        return cls(
            nonconverging_attempts=_count(stats.get(CounterKey.NONCONVERGING_ATTEMPTS)),
            offline_attempts=_count(stats.get(CounterKey.OFFLINE_ATTEMPTS)),
            failed_targets=frozenset(t for t in targets if isinstance(t, str))
            if isinstance(targets, list)
            else frozenset(),
        )

    def after(self, *, nonconverging: bool, offline: bool, failed_target: str | None) -> RetryCounters:
        """The counters once one more attempt failed (``failed_target``: the target, when it was at fault)."""
        return RetryCounters(
            nonconverging_attempts=self.nonconverging_attempts + nonconverging,
            offline_attempts=self.offline_attempts + offline,
            failed_targets=self.failed_targets | ({failed_target} if failed_target else set()),
        )

    def to_stats(self) -> dict[str, object]:
        """The stats entries (plain JSON values, targets sorted)."""
        return {
            CounterKey.NONCONVERGING_ATTEMPTS.value: self.nonconverging_attempts,
            CounterKey.OFFLINE_ATTEMPTS.value: self.offline_attempts,
            CounterKey.FAILED_TARGETS.value: sorted(self.failed_targets),
        }


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
