"""The retry policy after a failed attempt (host_engine.retry)."""

from __future__ import annotations

import doctest

from hypothesis import given
from hypothesis import strategies as st

from host_engine import retry
from host_engine.retry import RetryConfig, after_failure, backoff_s


def test_retry_docstring_examples_hold() -> None:
    assert doctest.testmod(retry).failed == 0


@given(
    attempt=st.integers(min_value=1, max_value=10),
    max_attempts=st.integers(min_value=1, max_value=10),
    target_at_fault=st.booleans(),
    abort_reason=st.sampled_from([None, "stalled", "timeout", "no_transfer", "switchover_timeout"]),
    nonconverging=st.integers(min_value=0, max_value=5),
    r=st.floats(min_value=0, max_value=1),
)
def test_retry_goes_offline_exactly_when_attempts_or_convergence_are_used_up(
    attempt: int,
    max_attempts: int,
    target_at_fault: bool,
    abort_reason: str | None,
    nonconverging: int,
    r: float,
) -> None:
    cfg = RetryConfig()
    d = after_failure(
        attempt=attempt,
        max_attempts=max_attempts,
        target_at_fault=target_at_fault,
        abort_reason=abort_reason,
        nonconverging_attempts=nonconverging,
        config=cfg,
        rand=lambda: r,
    )
    assert d.offline is (attempt >= max_attempts or nonconverging >= cfg.max_nonconverging)
    if d.offline:
        assert d.delay_s == cfg.offline_notice_s
        assert not d.other_target
    else:
        assert d.other_target is target_at_fault
        assert cfg.backoff_s * (1 - cfg.jitter) <= d.delay_s <= cfg.backoff_max_s * (1 + cfg.jitter)


@given(st.integers(min_value=1, max_value=30))
def test_retry_backoff_grows_and_is_capped(attempt: int) -> None:
    cfg = RetryConfig(jitter=0.0)
    assert backoff_s(attempt + 1, cfg) >= backoff_s(attempt, cfg)
    assert backoff_s(attempt, cfg) <= cfg.backoff_max_s
