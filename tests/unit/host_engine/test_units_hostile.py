"""Sizes and durations from flags and config files: hostile values are one clear error, never a crash."""

from __future__ import annotations

import contextlib
from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from host_engine.errors import InvalidInput
from host_engine.timeparse import parse_duration
from host_engine.units import parse_size


@pytest.mark.parametrize(
    "text", ["\uff12\uff10\uff10MiB", "\u0662GiB", "9" * 400 + "GiB", "1" + "0" * 30 + "TiB"]
)
def test_sizes_that_are_not_ascii_numbers_or_absurdly_large_are_refused(text: str) -> None:
    with pytest.raises(InvalidInput) as e:
        parse_size(text, field="--memory")
    message = str(e.value)
    assert message.startswith("--memory: ") and len(message) < 200


@pytest.mark.parametrize("text", ["\uff19m", "9" * 400 + "s", "9" * 30, "99999999999w"])
def test_durations_that_are_not_ascii_numbers_or_absurdly_long_are_refused(text: str) -> None:
    with pytest.raises(InvalidInput) as e:
        parse_duration(text, field="--notice")
    assert str(e.value).startswith("--notice: ") and len(str(e.value)) < 200


def test_ordinary_values_still_parse() -> None:
    assert parse_size("200MiB") == 200 * 1024 * 1024
    assert parse_duration("1h30m") == timedelta(minutes=90)
    assert parse_duration("3650d") == timedelta(days=3650)


@given(st.text(max_size=60))
def test_any_text_parses_or_is_one_invalid_input(text: str) -> None:
    for parse in (parse_size, parse_duration):
        with contextlib.suppress(InvalidInput):
            parse(text)
