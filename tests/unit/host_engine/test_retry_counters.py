"""The retry path's counters are typed (``RetryCounters``) and read tolerantly from any row's stats: a row
written before they were typed, or hand-edited, still decides retries the same way (issue 16.5)."""

from __future__ import annotations

import json

import pytest

from host_engine.retry import CounterKey, RetryCounters


def test_counters_read_the_json_rows_have_always_stored() -> None:
    # What an engine before the typed counters wrote (same names, same plain values).
    old_row = json.loads(
        '{"nonconverging_attempts": 1, "offline_attempts": 2, "failed_targets": ["hv3", "hv2"]}'
    )
    c = RetryCounters.from_stats(old_row)
    assert c == RetryCounters(1, 2, frozenset({"hv2", "hv3"}))
    assert c.to_stats() == {
        "nonconverging_attempts": 1,
        "offline_attempts": 2,
        "failed_targets": ["hv2", "hv3"],
    }
    assert {k.value for k in CounterKey} == set(c.to_stats())


def test_a_fresh_migration_has_counted_nothing() -> None:
    assert RetryCounters.from_stats({}) == RetryCounters()
    assert RetryCounters.from_stats({"progress": {"phase": "disk"}}).to_stats() == {
        "nonconverging_attempts": 0,
        "offline_attempts": 0,
        "failed_targets": [],
    }


@pytest.mark.parametrize(
    "bad",
    [
        {"nonconverging_attempts": "2", "offline_attempts": None, "failed_targets": "hv2"},
        {"nonconverging_attempts": -1, "offline_attempts": True, "failed_targets": [3, None]},
        {"nonconverging_attempts": 1.5, "offline_attempts": [], "failed_targets": {"hv2": 1}},
    ],
)
def test_unreadable_values_count_as_none(bad: dict[str, object]) -> None:
    assert RetryCounters.from_stats(bad) == RetryCounters()


def test_each_failure_adds_to_the_counters() -> None:
    c = RetryCounters().after(nonconverging=True, offline=False, failed_target="hv2")
    c = c.after(nonconverging=False, offline=True, failed_target=None)
    assert c == RetryCounters(1, 1, frozenset({"hv2"}))
