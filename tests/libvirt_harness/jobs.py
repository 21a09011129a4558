"""Watching a migration job from outside the engine, as a test that injects a fault mid-copy does."""

from __future__ import annotations

import time
from typing import Any

POLL_S = 0.1
MEMORY_WAIT_S = 120.0


def wait_until_memory_moves(dom: Any, *, timeout_s: float = MEMORY_WAIT_S) -> bool:
    """Wait until the migration job of ``dom`` (a source domain) has sent memory: its disk is copied and
    pre-copy began. Returns False if that did not happen within ``timeout_s`` (the job may also have ended)."""
    import libvirt

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if int(dom.jobStats().get("memory_processed", 0)) > 0:
                return True
        except libvirt.libvirtError as e:  # the job may not exist yet
            print(f"waiting for the job: {e}")
        time.sleep(POLL_S)
    return False
