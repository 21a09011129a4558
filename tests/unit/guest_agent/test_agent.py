"""The agent's policy and state machine, driven by notices, with fake hooks and a fake clock."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest

from guest_agent.config import Phase
from guest_agent.errors import AckRejected, MetadataUnreachable
from guest_agent.hooks.base import HookContext, HookResult
from guest_agent.journal import HookOutcome
from guest_agent.source import CLEAR, Notice, NoticeKind
from guest_agent.states import EventStatus

from .conftest import World, fail, live, make_agent, offline


def status(w: World, event_id: str) -> EventStatus:
    rec = w.agent.journal.event(event_id)
    assert rec is not None
    return rec.status


def outcome(w: World, event_id: str, phase: Phase, name: str) -> HookOutcome | None:
    rec = w.agent.journal.event(event_id)
    assert rec is not None
    hook = rec.hook(phase, name)
    return hook.outcome if hook else None


def test_agent_live_migrate_drains_waits_and_restores(world: World) -> None:
    world.agent.handle(live())
    assert world.recorder.names() == ["tell-lb", "drain"]  # webhooks first: people hear before slow drains
    assert status(world, "ev-1") is EventStatus.DRAINED

    world.agent.handle(live())  # the same event again: nothing new
    assert world.recorder.names() == ["tell-lb", "drain"]

    world.agent.handle(CLEAR)
    assert world.recorder.names() == ["tell-lb", "drain", "restore"]
    assert status(world, "ev-1") is EventStatus.DONE
    assert world.agent.journal.active() is None
    assert world.power_offs == []
    assert world.source.acks == []


def test_agent_ignores_no_event_and_unknown_values(world: World) -> None:
    world.agent.handle(None)
    world.agent.handle(CLEAR)
    world.agent.handle(Notice(NoticeKind.OTHER, "reboot_soon"))
    assert world.recorder.calls == []
    assert world.agent.journal.events() == []


@pytest.mark.parametrize("policy", ["", "power_on_after = false"])
def test_agent_offline_migrate_runs_the_shutdown_path(
    world_factory: Callable[..., World], policy: str
) -> None:
    w = world_factory(policy=policy)
    w.agent.handle(offline("ev-2"))
    assert w.recorder.names() == ["tell-lb", "drain", "stop-app"]
    assert w.source.acks == [("ev-2", "offline", policy == "")]
    assert len(w.power_offs) == 1
    assert status(w, "ev-2") is EventStatus.POWERED_OFF

    w.agent.handle(offline("ev-2"))  # still set (the power-off command was harmless): nothing again
    assert len(w.power_offs) == 1

    w.restart().handle(CLEAR)  # the next boot: the migration is over
    assert w.recorder.names()[-1] == "restore"
    assert status(w, "ev-2") is EventStatus.DONE


def test_agent_prefer_offline_shuts_down_for_a_live_event(world_factory: Callable[..., World]) -> None:
    w = world_factory(policy="prefer_offline = true")
    w.agent.handle(live("ev-3"))
    assert w.recorder.names() == ["tell-lb", "drain", "stop-app"]
    assert w.source.acks == [("ev-3", "offline", True)]
    assert len(w.power_offs) == 1


def test_agent_does_not_power_off_when_the_ack_is_refused(world: World) -> None:
    world.source.ack_errors = [AckRejected("409: not the current event")]
    world.agent.handle(offline("ev-2"))
    assert world.power_offs == []
    assert outcome(world, "ev-2", Phase.BEFORE_OFFLINE, "@ack-offline") is HookOutcome.FAILED
    # The event went away: restore what was drained.
    assert world.recorder.names()[-1] == "restore"
    assert status(world, "ev-2") is EventStatus.DONE


def test_agent_retries_the_ack_then_powers_off_anyway(world: World) -> None:
    world.source.ack_errors = [MetadataUnreachable("down")] * 10
    world.agent.handle(offline("ev-2"))
    assert len(world.power_offs) == 1  # the engine treats a droplet found shut off as offline
    assert outcome(world, "ev-2", Phase.BEFORE_OFFLINE, "@ack-offline") is HookOutcome.FAILED


def test_agent_ack_recovers_after_a_transient_outage(world: World) -> None:
    world.source.ack_errors = [MetadataUnreachable("down")]
    world.agent.handle(offline("ev-2"))
    assert world.source.acks == [("ev-2", "offline", True)]
    assert outcome(world, "ev-2", Phase.BEFORE_OFFLINE, "@ack-offline") is HookOutcome.OK


def test_agent_failed_hook_is_reported_and_the_next_one_runs(world: World) -> None:
    world.recorder.behaviour["tell-lb"] = fail("HTTP 500")
    world.agent.handle(live())
    assert world.recorder.names() == ["tell-lb", "drain"]
    assert outcome(world, "ev-1", Phase.ON_NOTICE, "tell-lb") is HookOutcome.FAILED
    assert outcome(world, "ev-1", Phase.ON_NOTICE, "drain") is HookOutcome.OK
    assert world.agent.metrics.render().count(
        'guest_agent_hook_failures_total{phase="on_notice",hook="tell-lb"} 1'
    )


STOP_CONFIG = """
[agent]
journal_path = "{journal}"
power_off_command = ["/bin/true"]
{policy}
[[on_notice]]
name = "first"
command = ["first"]
stop_on_failure = true
[[on_notice]]
name = "second"
command = ["second"]
[[before_offline]]
name = "must-work"
command = ["x"]
stop_on_failure = true
[[before_offline]]
name = "after-it"
command = ["y"]
"""


def test_agent_stop_on_failure_skips_the_rest_of_the_phase(world_factory: Callable[..., World]) -> None:
    w = world_factory(config_text=STOP_CONFIG)
    w.recorder.behaviour["first"] = fail()
    w.agent.handle(live())
    assert w.recorder.names() == ["first"]
    assert outcome(w, "ev-1", Phase.ON_NOTICE, "second") is HookOutcome.SKIPPED
    w.restart().handle(live())  # a skipped hook is finished: not run after a restart either
    assert w.recorder.names() == ["first"]


def test_agent_voluntary_shutdown_is_abandoned_when_a_stop_hook_fails(
    world_factory: Callable[..., World],
) -> None:
    w = world_factory(config_text=STOP_CONFIG, policy="prefer_offline = true")
    w.recorder.behaviour["must-work"] = fail()
    w.agent.handle(live())
    assert w.power_offs == []
    assert w.source.acks == []
    assert status(w, "ev-1") is EventStatus.DRAINED  # the live migration goes ahead
    w.agent.handle(live())
    assert w.recorder.names().count("must-work") == 1
    w.agent.handle(CLEAR)
    assert status(w, "ev-1") is EventStatus.DONE


def test_agent_required_shutdown_goes_on_when_a_stop_hook_fails(world_factory: Callable[..., World]) -> None:
    w = world_factory(config_text=STOP_CONFIG)
    w.recorder.behaviour["must-work"] = fail()
    w.agent.handle(offline())
    assert len(w.power_offs) == 1  # offline_migrate needs the droplet off whatever a hook says
    assert outcome(w, "ev-2", Phase.BEFORE_OFFLINE, "after-it") is HookOutcome.SKIPPED


def test_agent_cuts_a_hook_at_the_deadline(world: World) -> None:
    world.agent.handle(live(deadline=world.clock.in_s(25)))
    # Hooks default to 60 s; only 25 s (then 24 s, after the 1 s webhook) are left.
    timeouts = {c.name: c.timeout_s for c in world.recorder.calls}
    assert timeouts == {"tell-lb": pytest.approx(25), "drain": pytest.approx(24)}
    env = world.recorder.calls[0].env
    assert env["MAINTENANCE_EVENT"] == "live_migrate"
    assert env["MAINTENANCE_EVENT_ID"] == "ev-1"
    assert env["MAINTENANCE_DEADLINE"].startswith("2027-01-15T08:00:25")


def test_agent_margin_never_eats_a_short_notice(world_factory: Callable[..., World]) -> None:
    text = '[agent]\njournal_path = "{journal}"\n{policy}\n[[on_notice]]\nname = "drain"\ncommand = ["x"]\n'
    w = world_factory(config_text=text, policy="deadline_margin_s = 30")
    w.agent.handle(live(deadline=w.clock.in_s(8)))  # an 8 s notice: the margin is 2 s, not 30
    assert [(c.name, c.timeout_s) for c in w.recorder.calls] == [("drain", pytest.approx(6))]


def test_agent_an_unknown_value_does_not_end_a_drained_event(world: World) -> None:
    world.agent.handle(live())
    world.agent.handle(Notice(NoticeKind.OTHER, "live_migrate_v2"))
    assert status(world, "ev-1") is EventStatus.DRAINED
    assert world.recorder.names() == ["tell-lb", "drain"]


def test_agent_skips_hooks_once_the_deadline_passed(world: World) -> None:
    def slow(ctx: HookContext, timeout_s: float) -> HookResult:
        world.clock.advance(timeout_s)  # runs into the deadline
        return HookResult.cut("killed at its timeout")

    world.recorder.behaviour["tell-lb"] = slow
    world.agent.handle(live(deadline=world.clock.in_s(25)))
    assert world.recorder.names() == ["tell-lb"]
    assert outcome(world, "ev-1", Phase.ON_NOTICE, "drain") is HookOutcome.SKIPPED
    world.agent.handle(CLEAR)
    assert world.recorder.names() == ["tell-lb", "restore"]  # after_migration has no event deadline


@pytest.mark.parametrize(
    ("deadline_s", "not_before_s"),
    [
        (-5, 3600),  # the deadline already past, the migration an hour away
        (-5, -5),  # both past (the server's clock, or a late notice)
        (5, 3600),  # a deadline before not_before
        (-3600, None),  # no not_before, a deadline long past
    ],
)
def test_agent_nonsense_deadline_still_runs_the_hooks_by_the_default_notice(
    world_factory: Callable[..., World],
    caplog: pytest.LogCaptureFixture,
    deadline_s: float,
    not_before_s: float | None,
) -> None:
    w = world_factory(policy="default_notice_s = 300")
    notice = Notice(
        NoticeKind.LIVE_MIGRATE,
        "live_migrate",
        "ev-1",
        "scheduled",
        not_before=None if not_before_s is None else w.clock.in_s(not_before_s),
        deadline=w.clock.in_s(deadline_s),
    )
    first_seen = w.clock.now
    w.agent.handle(notice)
    assert w.recorder.names() == ["tell-lb", "drain"]
    assert [c.timeout_s for c in w.recorder.calls] == [60, 60]  # not cut to the nonsense deadline
    assert outcome(w, "ev-1", Phase.ON_NOTICE, "drain") is HookOutcome.OK
    rec = w.agent.journal.event("ev-1")
    assert rec is not None and rec.deadline == pytest.approx(first_seen + 300)
    assert any("default notice" in r.getMessage() for r in caplog.records)
    w.agent.handle(notice)  # seen again: still the same, sane deadline
    rec = w.agent.journal.event("ev-1")
    assert rec is not None and rec.deadline == pytest.approx(first_seen + 300)


def test_agent_text_only_server_uses_the_configured_notice(world_factory: Callable[..., World]) -> None:
    w = world_factory(policy="default_notice_s = 30")
    w.agent.handle(Notice(NoticeKind.LIVE_MIGRATE, "live_migrate"))  # no id, no times
    rec = w.agent.journal.active()
    assert rec is not None
    assert rec.server_id is None
    assert rec.deadline == pytest.approx(w.clock.now - 2 + 30)  # first sight + 30 s (2 hooks took 1 s each)
    w.agent.handle(Notice(NoticeKind.LIVE_MIGRATE, "live_migrate"))
    assert w.recorder.names() == ["tell-lb", "drain"]
    w.agent.handle(CLEAR)
    assert w.recorder.names() == ["tell-lb", "drain", "restore"]


def test_agent_offline_event_supersedes_a_drained_live_one(world: World) -> None:
    world.agent.handle(live("ev-1"))
    world.agent.handle(offline("ev-9"))  # the live migration failed for good: offline_required
    assert status(world, "ev-1") is EventStatus.SUPERSEDED
    assert world.recorder.names() == ["tell-lb", "drain", "stop-app"]  # the drain is not repeated
    assert world.source.acks == [("ev-9", "offline", True)]
    world.agent.handle(CLEAR)
    assert world.recorder.names()[-1] == "restore"
    assert status(world, "ev-9") is EventStatus.DONE


def test_agent_a_new_live_event_after_an_old_one_restores_then_drains_again(world: World) -> None:
    world.agent.handle(live("ev-1"))
    world.agent.handle(live("ev-5"))  # the clear was missed (e.g. during an outage)
    assert world.recorder.names() == ["tell-lb", "drain", "restore", "tell-lb", "drain"]
    assert status(world, "ev-1") is EventStatus.DONE
    assert status(world, "ev-5") is EventStatus.DRAINED


def test_agent_runs_after_hooks_when_the_flag_cleared_while_it_was_down(world: World) -> None:
    world.agent.handle(live())
    agent = world.restart()
    agent.handle(None)  # nothing known yet after the start: wait
    assert world.recorder.names() == ["tell-lb", "drain"]
    agent.handle(CLEAR)
    assert world.recorder.names() == ["tell-lb", "drain", "restore"]


def test_agent_stop_request_finishes_the_running_hook_and_starts_no_other(world: World) -> None:
    def stop_during(ctx: object, timeout_s: float) -> HookResult:
        world.agent.request_stop()  # SIGTERM arrives while this hook runs
        return HookResult.ok()

    world.recorder.behaviour["tell-lb"] = stop_during
    world.agent.handle(live())
    assert world.recorder.names() == ["tell-lb"]
    assert status(world, "ev-1") is EventStatus.DRAINING

    world.restart().handle(None)  # the next start resumes the phase without waiting for the server
    assert world.recorder.names() == ["tell-lb", "drain"]
    assert status(world, "ev-1") is EventStatus.DRAINED


def _crash_in(w: World, event_id: str, phase: Phase, name: str) -> None:
    """What a kill -9 while ``name`` ran leaves in the journal: its start, no end."""
    w.agent.journal.hook_started(event_id, phase, name)


@pytest.mark.parametrize(("idempotent", "runs_again"), [(False, False), (True, True)])
def test_agent_interrupted_hook_reruns_only_if_idempotent(
    world_factory: Callable[..., World], idempotent: bool, runs_again: bool
) -> None:
    text = """
[agent]
journal_path = "{journal}"
{policy}
[[on_notice]]
name = "a"
command = ["a"]
[[on_notice]]
name = "b"
command = ["b"]
idempotent = IDEMPOTENT
[[on_notice]]
name = "c"
command = ["c"]
""".replace("IDEMPOTENT", str(idempotent).lower())
    w = world_factory(config_text=text)
    w.recorder.behaviour["b"] = lambda ctx, t: (_crash_in(w, "ev-1", Phase.ON_NOTICE, "c"), HookResult.ok())[
        1
    ]
    # Simulate the first life: a ran, b was running when the process died.
    w.agent.journal.begin_event(
        event_id="ev-1", server_id="ev-1", kind="live_migrate", deadline=None, not_before=None
    )
    w.agent.journal.set_status("ev-1", EventStatus.DRAINING)
    w.agent.journal.hook_started("ev-1", Phase.ON_NOTICE, "a")
    w.agent.journal.hook_finished("ev-1", Phase.ON_NOTICE, "a", HookOutcome.OK)
    w.agent.journal.hook_started("ev-1", Phase.ON_NOTICE, "b")
    w.recorder.behaviour.clear()

    w.restart().handle(live())
    assert w.recorder.names() == (["b", "c"] if runs_again else ["c"])
    expected = HookOutcome.OK if runs_again else HookOutcome.INTERRUPTED
    assert outcome(w, "ev-1", Phase.ON_NOTICE, "b") is expected
    rec = w.agent.journal.event("ev-1")
    assert rec is not None
    a = rec.hook(Phase.ON_NOTICE, "a")
    assert a is not None
    assert a.runs == 1


def test_agent_never_powers_off_twice(world: World) -> None:
    # First life: the power-off command was started, then the machine went down before its end was saved.
    journal = world.agent.journal
    journal.begin_event(
        event_id="ev-2", server_id="ev-2", kind="offline_migrate", deadline=None, not_before=None
    )
    for s in (EventStatus.DRAINING, EventStatus.DRAINED, EventStatus.SHUTTING_DOWN):
        journal.set_status("ev-2", s)
    for name in ("drain", "tell-lb"):
        journal.hook_started("ev-2", Phase.ON_NOTICE, name)
        journal.hook_finished("ev-2", Phase.ON_NOTICE, name, HookOutcome.OK)
    journal.hook_started("ev-2", Phase.BEFORE_OFFLINE, "stop-app")
    journal.hook_finished("ev-2", Phase.BEFORE_OFFLINE, "stop-app", HookOutcome.OK)
    journal.hook_started("ev-2", Phase.BEFORE_OFFLINE, "@ack-offline")
    journal.hook_finished("ev-2", Phase.BEFORE_OFFLINE, "@ack-offline", HookOutcome.OK)
    journal.hook_started("ev-2", Phase.BEFORE_OFFLINE, "@power-off")

    agent = world.restart()
    agent.handle(offline("ev-2"))  # booted while the event is still set
    assert world.power_offs == []
    assert world.recorder.calls == []
    assert status(world, "ev-2") is EventStatus.POWERED_OFF
    agent.handle(CLEAR)
    assert world.recorder.names() == ["restore"]


def test_agent_cleared_before_anything_ran_is_done(world: World) -> None:
    journal = world.agent.journal
    journal.begin_event(
        event_id="ev-1", server_id="ev-1", kind="live_migrate", deadline=None, not_before=None
    )
    world.restart().handle(CLEAR)
    assert world.recorder.calls == []
    assert status(world, "ev-1") is EventStatus.DONE


def test_agent_acknowledges_ready_after_the_drain_when_asked(world_factory: Callable[..., World]) -> None:
    w = world_factory(policy="acknowledge_ready = true")
    w.agent.handle(live("ev-1"))
    w.agent.handle(live("ev-1"))
    assert w.source.acks == [("ev-1", "ready", True)]


@pytest.mark.parametrize(
    "result",
    [
        HookResult.failed("exit status 1"),
        HookResult.cut("killed at its timeout"),
    ],
    ids=["failed", "cut"],
)
def test_agent_never_acknowledges_ready_after_a_drain_hook_did_not_succeed(
    world_factory: Callable[..., World], caplog: pytest.LogCaptureFixture, result: HookResult
) -> None:
    w = world_factory(policy="acknowledge_ready = true")
    w.recorder.behaviour["drain"] = lambda ctx, timeout_s: result
    w.agent.handle(live("ev-1"))
    w.agent.handle(live("ev-1"))
    assert w.source.acks == []  # the platform must not start early on an undrained droplet
    rec = w.agent.journal.event("ev-1")
    assert (
        rec is not None and rec.status is EventStatus.DRAINED
    )  # the migration still goes ahead at not_before
    assert sum("not acknowledging ready" in r.getMessage() for r in caplog.records) == 1
    w.restart().handle(live("ev-1"))  # a restart does not change its mind
    assert w.source.acks == []


def test_agent_never_acknowledges_ready_when_a_drain_hook_was_interrupted(
    world_factory: Callable[..., World],
) -> None:
    w = world_factory(policy="acknowledge_ready = true")
    j = w.agent.journal  # as a kill -9 during the (not idempotent) drain hook left it
    j.begin_event(event_id="ev-1", server_id="ev-1", kind="live_migrate", deadline=None, not_before=None)
    j.set_status("ev-1", EventStatus.DRAINING)
    j.hook_started("ev-1", Phase.ON_NOTICE, "tell-lb")
    j.hook_finished("ev-1", Phase.ON_NOTICE, "tell-lb", HookOutcome.OK)
    j.hook_started("ev-1", Phase.ON_NOTICE, "drain")
    w.restart().handle(live("ev-1"))
    assert outcome(w, "ev-1", Phase.ON_NOTICE, "drain") is HookOutcome.INTERRUPTED
    assert w.source.acks == []


def test_agent_an_event_handled_to_the_end_is_not_handled_again(world: World) -> None:
    world.agent.handle(live("ev-1"))
    world.agent.handle(CLEAR)
    world.agent.handle(live("ev-1"))  # a stale reading
    assert [e.event_id for e in world.agent.journal.events()] == ["ev-1"]
    assert world.recorder.names() == ["tell-lb", "drain", "restore"]


def test_agent_a_crashing_hook_is_a_failed_hook(world: World) -> None:
    def explode(ctx: object, timeout_s: float) -> HookResult:
        raise RuntimeError("bug in a hook")

    world.recorder.behaviour["tell-lb"] = explode
    world.agent.handle(live())
    assert outcome(world, "ev-1", Phase.ON_NOTICE, "tell-lb") is HookOutcome.FAILED
    assert outcome(world, "ev-1", Phase.ON_NOTICE, "drain") is HookOutcome.OK


def test_agent_stop_while_retrying_the_ack_leaves_it_for_the_next_start(world: World) -> None:
    def sleep(seconds: float) -> None:  # the wait before the second attempt: SIGTERM arrives
        world.agent.request_stop()
        world.clock.sleep(seconds)

    world.source.ack_errors = [MetadataUnreachable("down")]
    world.agent = make_agent(world, sleep=sleep)
    world.agent.handle(offline("ev-2"))
    assert world.power_offs == []
    assert status(world, "ev-2") is EventStatus.SHUTTING_DOWN

    world.restart().handle(offline("ev-2"))  # the ack is sent again, then the power-off
    assert world.source.acks == [("ev-2", "offline", True)]
    assert len(world.power_offs) == 1
    assert world.recorder.names().count("stop-app") == 1


def test_agent_reports_a_hook_cut_by_the_deadline(world: World) -> None:
    world.recorder.behaviour["drain"] = lambda ctx, timeout_s: HookResult.cut(f"killed at {timeout_s:g} s")
    world.agent.handle(live(deadline=world.clock.in_s(20)))
    rec = world.agent.journal.event("ev-1")
    assert rec is not None
    drain = rec.hook(Phase.ON_NOTICE, "drain")
    assert drain is not None
    assert drain.outcome is HookOutcome.CUT
    assert "cut at the event's deadline" in drain.detail


def test_agent_passes_the_servers_prediction_to_hooks(world: World) -> None:
    notice = replace(
        live(deadline=world.clock.in_s(600)), expected_downtime_ms=250.0, expected_duration_s=90.0
    )
    world.agent.handle(notice)
    env = world.recorder.calls[0].env
    assert env["MAINTENANCE_EXPECTED_DOWNTIME_MS"] == "250"
    assert env["MAINTENANCE_EXPECTED_DURATION_S"] == "90"
