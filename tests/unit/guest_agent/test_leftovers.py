"""Hooks that outlive a ``kill -9`` of the agent: recognised after the restart, waited for or ended, never doubled.

Real processes in their own sessions (as ``run_program`` starts hooks); the agent's clock is the fake one, so
"waiting up to the hook's timeout" takes no real time and ends with the leftover killed.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from guest_agent import procgroups
from guest_agent.agent import Agent
from guest_agent.config import Phase
from guest_agent.journal import HookOutcome, Journal
from guest_agent.procgroups import ProcessIdentity
from guest_agent.states import EventStatus

from .conftest import World, live

CONFIG = """
[metadata]
url = "http://127.0.0.1:1"
[agent]
journal_path = "{journal}"
power_off_command = ["/bin/true"]
deadline_margin_s = 0
{policy}
[[on_notice]]
name = "drain"
command = ["drain"]
idempotent = true
timeout_s = 60
"""


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(*argv: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(list(argv or ("sleep", "60")), start_new_session=True)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def _crashed_during_drain(w: World, pid: int | None, *, ident: ProcessIdentity | None = None) -> None:
    """The journal as a kill -9 of the agent left it, while the drain hook (program ``pid``) ran."""
    j = w.agent.journal
    j.begin_event(event_id="ev-1", server_id="ev-1", kind="live_migrate", deadline=None, not_before=None)
    j.set_status("ev-1", EventStatus.DRAINING)
    j.hook_started("ev-1", Phase.ON_NOTICE, "drain", timeout_s=60)
    if ident is None and pid is not None:
        ident = procgroups.identify(pid)
    j.hook_process("ev-1", Phase.ON_NOTICE, "drain", ident)


def _hook(w: World) -> object:
    rec = w.agent.journal.event("ev-1")
    assert rec is not None
    return rec.hook(Phase.ON_NOTICE, "drain")


# ---- recognising a leftover


def test_procgroups_recognise_a_live_group_and_only_that_group(
    spawn: Callable[..., subprocess.Popen[bytes]],
) -> None:
    proc = spawn()
    ident = procgroups.identify(proc.pid)
    assert ident.pgid == proc.pid and ident.boot_id and ident.start_ticks is not None
    assert procgroups.alive(ident)
    assert not procgroups.alive(replace(ident, start_ticks=ident.start_ticks + 1))  # the id was reused
    assert not procgroups.alive(replace(ident, boot_id="another-boot"))  # rebooted since
    assert procgroups.end(ident, grace_s=2)
    assert proc.wait(5) < 0  # killed by a signal
    assert not procgroups.alive(ident)


def test_procgroups_a_group_whose_leader_is_gone_but_a_child_lives_is_alive(tmp_path: Path) -> None:
    pid_file = tmp_path / "child"
    # The leader starts a background child in its group, then exits: the group lives on in the child.
    script = f"sleep 60 & echo $! > {pid_file}"
    leader = subprocess.Popen(["/bin/sh", "-c", script], start_new_session=True)
    ident = procgroups.identify(leader.pid)
    leader.wait(10)
    try:
        assert procgroups.alive(ident)
    finally:
        assert procgroups.end(ident, grace_s=2)
    assert not procgroups.alive(ident)


def test_procgroups_a_zombie_is_not_alive(spawn: Callable[..., subprocess.Popen[bytes]]) -> None:
    proc = spawn(sys.executable, "-c", "pass")
    ident = procgroups.identify(proc.pid)
    assert procgroups.wait_gone(ident, 10)  # exited; not reaped yet (a zombie) until the fixture waits


# ---- the agent after a restart


def test_agent_waits_for_then_ends_a_leftover_hook_and_never_runs_it_beside(
    world_factory: Callable[..., World],
    spawn: Callable[..., subprocess.Popen[bytes]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    w = world_factory(config_text=CONFIG)
    leftover = spawn()
    _crashed_during_drain(w, leftover.pid)
    started = w.clock.mono

    w.restart().handle(live("ev-1"))

    assert w.clock.mono - started == pytest.approx(60, abs=1)  # waited out the hook's timeout (fake time)
    assert leftover.wait(10) < 0  # then ended it
    assert w.recorder.names() == []  # and did not run a second copy
    hook = _hook(w)
    assert getattr(hook, "outcome", None) is HookOutcome.CUT
    assert getattr(hook, "process", "?") is None
    assert w.agent.journal.event("ev-1").status is EventStatus.DRAINED  # type: ignore[union-attr]
    assert any("still running from before the restart" in r.getMessage() for r in caplog.records)


def test_agent_a_leftover_that_already_ended_is_decided_as_usual(
    world_factory: Callable[..., World], spawn: Callable[..., subprocess.Popen[bytes]]
) -> None:
    w = world_factory(config_text=CONFIG)
    gone = spawn("true")
    ident = procgroups.identify(gone.pid)
    gone.wait(10)
    _crashed_during_drain(w, None, ident=ident)
    started = w.clock.mono
    w.restart().handle(live("ev-1"))
    assert w.clock.mono - started < 5  # no waiting
    assert w.recorder.names() == ["drain"]  # idempotent: run again, now that no copy runs
    assert getattr(_hook(w), "outcome", None) is HookOutcome.OK


def test_agent_never_kills_a_process_that_reused_the_recorded_group_id(
    world_factory: Callable[..., World], spawn: Callable[..., subprocess.Popen[bytes]]
) -> None:
    w = world_factory(config_text=CONFIG)
    stranger = spawn()
    ident = procgroups.identify(stranger.pid)
    assert ident.start_ticks is not None
    _crashed_during_drain(w, None, ident=replace(ident, start_ticks=ident.start_ticks - 1))
    w.restart().handle(live("ev-1"))
    assert stranger.poll() is None  # left alone
    assert w.recorder.names() == ["drain"]


def test_agent_asked_to_stop_while_waiting_leaves_the_leftover_for_the_next_start(
    world_factory: Callable[..., World], spawn: Callable[..., subprocess.Popen[bytes]]
) -> None:
    w = world_factory(config_text=CONFIG)
    leftover = spawn()
    _crashed_during_drain(w, leftover.pid)
    agent = w.restart()
    agent.request_stop()  # SIGTERM
    agent.handle(live("ev-1"))
    assert leftover.poll() is None
    assert w.recorder.names() == []
    assert getattr(_hook(w), "process", None) is not None  # still recorded: the next start deals with it


def test_agent_journals_each_running_hook_program(
    world_factory: Callable[..., World], tmp_path: Path
) -> None:
    """The real command hook records its process group while it runs, and forgets it when it ends."""
    seen = tmp_path / "seen"
    journal = tmp_path / "journal.json"
    # The pgid is journaled right after the program starts (a few ms); reading it a second later is safe.
    text = CONFIG.replace(
        'command = ["drain"]', f'command = ["/bin/sh", "-c", "sleep 1; cat {journal} > {seen}"]'
    )
    w = world_factory(config_text=text)
    w.agent = Agent(w.config, Journal.open(journal, wall=w.clock.wall), source=w.source, wall=w.clock.wall)
    w.agent.handle(live("ev-1", deadline=w.clock.in_s(600)))
    assert getattr(_hook(w), "outcome", None) is HookOutcome.OK
    assert '"pgid"' in seen.read_text()  # journaled while it ran
    assert getattr(_hook(w), "process", "?") is None
