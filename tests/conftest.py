"""Fixtures shared by every test package live in each package's conftest; helpers in tests/support.py.

The one fixture here keeps tests independent of each other's logging: a daemon's ``main`` run in-process
(through click's CliRunner) installs its handler on the root logger and its excepthooks for the whole process,
and a later test's CLI would then log where it should print (``created a new store`` on stderr).

Hypothesis's timing checks (a per-example deadline, "input generation is slow") are off for every test: they
measure the machine, and CI's is shared and busy; a property test fails only on a counterexample.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("shared-machine", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("shared-machine")


@pytest.fixture(autouse=True)
def _restore_process_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    hooks = (sys.excepthook, threading.excepthook)
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    sys.excepthook, threading.excepthook = hooks
