"""The per-source connection cap both listeners' workers apply."""

from __future__ import annotations

import logging
from contextlib import ExitStack

import pytest

from metadata_server.source_cap import SourceCap, source_of


def test_source_cap_admits_up_to_the_cap_per_source_and_frees_on_close() -> None:
    cap = SourceCap("guest", 2)
    with ExitStack() as held:
        assert held.enter_context(cap.admit(("127.0.0.2", 40000)))
        assert held.enter_context(cap.admit(("::ffff:127.0.0.2", 40001, 0, 0)))  # the same source
        with cap.admit(("127.0.0.2", 40002)) as third:
            assert not third
        with cap.admit(("127.0.0.3", 40003)) as other:
            assert other  # another source is not affected
    with cap.admit(("127.0.0.2", 40004)) as again:
        assert again  # both closed: room again


def test_source_cap_logs_a_refused_source_once_a_minute(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    cap = SourceCap("admin", 1, clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="metadata_server.source_cap")
    with cap.admit(("10.0.0.9", 1)):
        for t in (0.0, 30.0, 59.0, 60.0, 61.0):
            now[0] = t
            with cap.admit(("10.0.0.9", 2)) as admitted:
                assert not admitted
    assert [r.getMessage() for r in caplog.records] == [
        "admin listener: 10.0.0.9 holds 1 connections already; refusing more (logged once a minute)"
    ] * 2


@pytest.mark.parametrize(
    ("addr", "source"),
    [
        (("127.0.0.2", 1), "127.0.0.2"),
        (("::ffff:10.1.2.3", 1, 0, 0), "10.1.2.3"),
        (("fe80::1%eth0", 1, 0, 2), "fe80::1"),
    ],
)
def test_source_of_counts_one_address_one_way(addr: tuple[object, ...], source: str) -> None:
    assert source_of(addr) == source
