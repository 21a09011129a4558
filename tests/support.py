"""Shared test helpers.

A test whose real part (a binary, a daemon, root) is missing skips on a developer's laptop with a reason
that says how to enable it, and FAILS under CI=true: CI must never pass by skipping.
"""

from __future__ import annotations

import os
import shutil

import pytest

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def require(condition: bool, reason: str) -> None:
    """Skip locally, fail in CI, when a real part the test needs is missing."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required for CI but missing: {reason}", pytrace=False)
    pytest.skip(reason)


def require_binary(name: str, how: str = "run `make system-deps` as root") -> str:
    path = shutil.which(name)
    require(path is not None, f"`{name}` not found on PATH ({how})")
    assert path is not None
    return path


def require_root(why: str) -> None:
    require(os.geteuid() == 0, f"needs root: {why}")
