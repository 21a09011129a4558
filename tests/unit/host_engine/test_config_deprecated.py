"""A key that no longer does anything still loads (an operator's config keeps working), with one warning."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from host_engine.config import load_config


def test_late_notice_grace_is_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = tmp_path / "engine.toml"
    cfg.write_text('[engine]\npoll_interval = "2s"\nlate_notice_grace = "1m"\n')
    with caplog.at_level(logging.WARNING, logger="host_engine.config"):
        config = load_config(str(cfg), env={}, overrides=())
    assert config.engine.poll_interval_s == 2.0
    assert not hasattr(config.engine, "late_notice_grace")
    assert [r.getMessage() for r in caplog.records] == [
        "config [engine] late_notice_grace is ignored: a guest always gets its full notice"
    ]
