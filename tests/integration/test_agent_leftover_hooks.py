"""``kill -9`` the real agent while a hook runs, and do NOT kill the hook: it outlives the agent (own session).

The restarted agent must find it in the journal and wait for it (up to the hook's timeout) or end it — never
run the hook again beside it (before: the idempotent hook ran again at once, copies overlapping).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration import test_agent_harness as harness
from tests.integration.test_agent_harness import DROPLET, AgentProcess, lines
from tests.servers import MetadataServer

metadata = harness.metadata
agent_factory = harness.agent_factory

pytestmark = pytest.mark.slow


def _exclusive_hook(tmp_path: Path, sleep_s: int) -> str:
    """A hook that notes its start and end, and ``overlap`` if another copy of it is running."""
    log, lock, pids = tmp_path / "log", tmp_path / "lock", tmp_path / "pids"
    return (
        f"echo $$ >> {pids}; "
        f"if ! mkdir {lock} 2>/dev/null; then echo overlap >> {log}; fi; "
        f"echo start >> {log}; sleep {sleep_s}; echo end >> {log}; rmdir {lock} 2>/dev/null; true"
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    return True


def test_agent_restart_waits_for_a_leftover_hook_before_running_it_again(
    tmp_path: Path, metadata: MetadataServer, agent_factory: Callable[..., AgentProcess]
) -> None:
    script = _exclusive_hook(tmp_path, 4)
    agent = agent_factory(
        hooks={"on_notice": [{"name": "drain", "command": ["/bin/sh", "-c", script], "idempotent": True}]}
    ).start()
    metadata.set_event(DROPLET, "ev-1", event="live_migrate", state="scheduled")
    agent.wait_for(lambda: lines(tmp_path / "log"), "the hook to start")
    agent.kill9()  # the hook keeps running: nobody kills its process group

    agent.start()
    agent.wait_status("ev-1", "drained", timeout_s=30)
    log = lines(tmp_path / "log")
    assert "overlap" not in log, log
    assert log == ["start", "end", "start", "end"]  # the leftover ended, then (idempotent) one more copy
    assert "still running from before the restart" in agent.log()
    assert agent.hook_outcome("ev-1", "on_notice", "drain") == "ok"


def test_agent_restart_ends_a_leftover_hook_at_its_timeout(
    tmp_path: Path, metadata: MetadataServer, agent_factory: Callable[..., AgentProcess]
) -> None:
    script = _exclusive_hook(tmp_path, 120)
    agent = agent_factory(
        hooks={
            "on_notice": [
                {"name": "drain", "command": ["/bin/sh", "-c", script], "idempotent": True, "timeout_s": 3}
            ]
        }
    ).start()
    metadata.set_event(DROPLET, "ev-1", event="live_migrate", state="scheduled")
    agent.wait_for(lambda: lines(tmp_path / "log"), "the hook to start")
    agent.kill9()
    (pid,) = (int(p) for p in lines(tmp_path / "pids"))
    try:
        agent.start()
        agent.wait_status("ev-1", "drained", timeout_s=30)
        assert not _alive(pid)  # ended at its timeout...
        assert lines(tmp_path / "log") == ["start"]  # ...and not run again beside it or after it
        assert agent.hook_outcome("ev-1", "on_notice", "drain") == "cut"
        assert "ended at its timeout" in agent.log()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
