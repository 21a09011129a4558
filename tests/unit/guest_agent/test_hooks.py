"""Hook kinds run for real: programs on this machine, HTTP through `responses`, libvirt's test driver."""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests
import responses

from guest_agent.config import (
    CommandHookSpec,
    NestedVMsHookSpec,
    Phase,
    RestartMethod,
    SystemdAction,
    SystemdHookSpec,
    WebhookHookSpec,
)
from guest_agent.hooks import build_hook
from guest_agent.hooks.base import EventInfo, HookContext
from guest_agent.hooks.command import CommandHook
from guest_agent.hooks.nested_vms import NestedVMsHook, data_key
from guest_agent.hooks.systemd import SystemdHook
from guest_agent.hooks.webhook import WebhookHook
from guest_agent.journal import HookOutcome
from guest_agent.states import MigrationKind
from tests.support import require

from .conftest import FakeClock

EVENT = EventInfo(
    event_id="ev-7",
    kind=MigrationKind.LIVE_MIGRATE,
    state="scheduled",
    not_before=datetime(2026, 12, 1, 2, 0, tzinfo=UTC),
    deadline=datetime(2026, 12, 1, 2, 0, tzinfo=UTC),
)


def ctx(
    phase: Phase = Phase.ON_NOTICE, data: dict[str, Any] | None = None, clock: FakeClock | None = None
) -> HookContext:
    if clock is None:
        return HookContext(event=EVENT, phase=phase, data=data or {})
    return HookContext(
        event=EVENT, phase=phase, data=data or {}, monotonic=clock.monotonic, sleep=clock.sleep
    )


# ---- command


def test_command_hook_gets_event_json_on_stdin_and_environment(tmp_path: Path) -> None:
    out = tmp_path / "out"
    script = (
        "import json, os, sys; doc = json.load(sys.stdin); "
        f"open({str(out)!r}, 'w').write(json.dumps({{'doc': doc, 'env': dict(os.environ)}}))"
    )
    spec = CommandHookSpec(name="drain", command=(sys.executable, "-c", script), env=(("EXTRA", "1"),))
    result = CommandHook(spec).run(ctx(), timeout_s=30)
    assert result.outcome is HookOutcome.OK
    got = json.loads(out.read_text())
    assert got["doc"]["event"] == "live_migrate"
    assert got["doc"]["id"] == "ev-7"
    assert got["doc"]["phase"] == "on_notice"
    assert got["doc"]["idempotency_key"] == "ev-7:on_notice:drain"
    env = got["env"]
    assert env["MAINTENANCE_EVENT"] == "live_migrate"
    assert env["MAINTENANCE_EVENT_ID"] == "ev-7"
    assert env["MAINTENANCE_DEADLINE"] == "2026-12-01T02:00:00Z"
    assert env["EXTRA"] == "1"


def test_command_hook_logs_output_line_by_line_with_its_name(caplog: pytest.LogCaptureFixture) -> None:
    spec = CommandHookSpec(name="chatty", command=("/bin/sh", "-c", "echo one; echo two >&2; exit 3"))
    with caplog.at_level(logging.INFO, logger="guest_agent.hooks.process"):
        result = CommandHook(spec).run(ctx(), timeout_s=30)
    assert result.outcome is HookOutcome.FAILED
    assert "exit status 3" in result.detail
    lines = [r.getMessage() for r in caplog.records if r.name == "guest_agent.hooks.process"]
    assert "hook chatty: one" in lines
    assert "hook chatty: two" in lines


def test_command_hook_is_cut_at_its_timeout() -> None:
    spec = CommandHookSpec(name="slow", command=("/bin/sleep", "30"))
    started = time.monotonic()
    result = CommandHook(spec).run(ctx(), timeout_s=1)
    assert result.outcome is HookOutcome.CUT
    assert time.monotonic() - started < 10


def test_command_hook_missing_program_is_a_failure_not_a_crash() -> None:
    spec = CommandHookSpec(name="nope", command=("/nonexistent/drain",))
    result = CommandHook(spec).run(ctx(), timeout_s=5)
    assert result.outcome is HookOutcome.FAILED
    assert "could not start" in result.detail


def test_command_hook_never_uses_a_shell(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    spec = CommandHookSpec(name="echo", command=("/bin/echo", f"; touch {marker}"))
    assert CommandHook(spec).run(ctx(), timeout_s=5).outcome is HookOutcome.OK
    assert not marker.exists()


# ---- systemd


def test_systemd_hook_runs_systemctl_with_action_and_units(tmp_path: Path) -> None:
    log_file = tmp_path / "calls"
    fake = tmp_path / "systemctl"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log_file}\n')
    fake.chmod(0o755)
    spec = SystemdHookSpec(
        name="stop",
        units=("app.service", "worker.service"),
        action=SystemdAction.STOP,
        systemctl=(str(fake),),
    )
    assert SystemdHook(spec).run(ctx(), timeout_s=10).outcome is HookOutcome.OK
    assert log_file.read_text() == "stop app.service worker.service\n"
    bad = SystemdHookSpec(name="bad", units=("x",), action=SystemdAction.START, systemctl=("/bin/false",))
    assert SystemdHook(bad).run(ctx(), timeout_s=10).outcome is HookOutcome.FAILED


# ---- webhook


def _webhook(**kw: Any) -> WebhookHook:
    spec = WebhookHookSpec(
        name="tell-lb", url="http://lb.test/drain", timeout_s=kw.pop("timeout_s", 60), **kw
    )
    return WebhookHook(spec)


@responses.activate
def test_webhook_posts_json_with_idempotency_key_and_retries_transient_errors() -> None:
    responses.post("http://lb.test/drain", status=503)
    responses.post("http://lb.test/drain", body=requests.ConnectionError("reset"))
    responses.post("http://lb.test/drain", status=204)
    clock = FakeClock()
    result = _webhook(headers=(("Authorization", "Bearer t"),)).run(ctx(clock=clock), timeout_s=60)
    assert result.outcome is HookOutcome.OK, result.detail
    assert len(responses.calls) == 3
    keys = {c.request.headers["Idempotency-Key"] for c in responses.calls}
    assert keys == {"ev-7:on_notice:tell-lb"}  # the same key on every attempt
    body = json.loads(responses.calls[0].request.body)  # type: ignore[arg-type]
    assert body["id"] == "ev-7"
    assert body["hook"] == "tell-lb"
    assert responses.calls[0].request.headers["Authorization"] == "Bearer t"


@responses.activate
def test_webhook_does_not_retry_a_client_error() -> None:
    responses.post("http://lb.test/drain", status=400)
    result = _webhook().run(ctx(clock=FakeClock()), timeout_s=60)
    assert result.outcome is HookOutcome.FAILED
    assert "HTTP 400" in result.detail
    assert len(responses.calls) == 1


@responses.activate
def test_webhook_gives_up_after_its_attempts() -> None:
    responses.post("http://lb.test/drain", status=500)
    result = _webhook(attempts=3).run(ctx(clock=FakeClock()), timeout_s=600)
    assert result.outcome is HookOutcome.FAILED
    assert len(responses.calls) == 3


@responses.activate
def test_webhook_is_cut_when_its_time_runs_out() -> None:
    responses.post("http://lb.test/drain", status=503, headers={"Retry-After": "30"})
    clock = FakeClock()
    result = _webhook(attempts=10).run(ctx(clock=clock), timeout_s=45)
    assert result.outcome is HookOutcome.CUT
    assert len(responses.calls) == 2  # 0 s, then 30 s later; a third at 60 s would overrun 45 s


class _SleepLog(FakeClock):
    def __init__(self) -> None:
        super().__init__()
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        super().sleep(seconds)


@pytest.mark.parametrize("retry_after", ["-1", "nan", "NaN", "inf", "garbage", ""])
@responses.activate
def test_webhook_hostile_retry_after_means_the_default_backoff(retry_after: str) -> None:
    responses.post("http://lb.test/drain", status=503, headers={"Retry-After": retry_after})
    clock = _SleepLog()
    result = _webhook(attempts=4).run(ctx(clock=clock), timeout_s=60)
    assert result.outcome is HookOutcome.FAILED
    assert len(responses.calls) == 4
    assert len(clock.sleeps) == 3
    assert all(0 < s <= 10.0 for s in clock.sleeps), clock.sleeps  # a real pause, never 0 or nan


@responses.activate
def test_webhook_huge_retry_after_is_clamped_not_a_reason_to_give_up() -> None:
    responses.post("http://lb.test/drain", status=503, headers={"Retry-After": "99999"})
    responses.post("http://lb.test/drain", status=204)
    clock = _SleepLog()
    result = _webhook(attempts=5).run(ctx(clock=clock), timeout_s=60)
    assert result.outcome is HookOutcome.OK, result.detail
    assert len(responses.calls) == 2
    assert 30.0 <= clock.sleeps[0] <= 31.0  # clamped to 30 s (+ jitter)


@responses.activate
def test_webhook_honours_an_http_date_retry_after() -> None:
    when = datetime.fromtimestamp(time.time() + 20, UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")
    responses.post("http://lb.test/drain", status=429, headers={"Retry-After": when})
    responses.post("http://lb.test/drain", status=200)
    clock = _SleepLog()
    result = _webhook().run(ctx(clock=clock), timeout_s=60)
    assert result.outcome is HookOutcome.OK, result.detail
    assert 17.0 <= clock.sleeps[0] <= 21.0


@responses.activate
def test_webhook_does_not_follow_redirects() -> None:
    responses.post("http://lb.test/drain", status=302, headers={"Location": "http://elsewhere.test/"})
    result = _webhook().run(ctx(clock=FakeClock()), timeout_s=60)
    assert result.outcome is HookOutcome.FAILED
    assert len(responses.calls) == 1


# ---- nested_vms (a stand-in with libvirt's methods; the real test driver below)


class FakeDomain:
    def __init__(self, name: str, active: bool) -> None:
        self._name = name
        self.active = active
        self.actions: list[str] = []

    def name(self) -> str:
        return self._name

    def isActive(self) -> int:
        return int(self.active)

    def reset(self, flags: int) -> None:
        self.actions.append("reset")

    def destroy(self) -> None:
        self.actions.append("destroy")
        self.active = False

    def create(self) -> None:
        self.actions.append("create")
        self.active = True


class FakeConn:
    def __init__(self, domains: list[FakeDomain]) -> None:
        self.domains = {d.name(): d for d in domains}

    def listAllDomains(self) -> list[FakeDomain]:
        return list(self.domains.values())

    def lookupByName(self, name: str) -> FakeDomain:
        return self.domains[name]

    def close(self) -> None:
        pass


@pytest.mark.parametrize(
    ("method", "expected"),
    [(RestartMethod.RESET, ["reset"]), (RestartMethod.DESTROY_START, ["destroy", "create"])],
)
def test_nested_vms_restarts_exactly_those_running_at_notice(
    method: RestartMethod, expected: list[str]
) -> None:
    conn = FakeConn([FakeDomain("web1", True), FakeDomain("web2", True), FakeDomain("db", False)])
    spec = NestedVMsHookSpec(name="vms", uri="fake://", restart=method, exclude=("web2",))
    hook = NestedVMsHook(spec, connect=lambda uri: conn)
    recorded = hook.run(ctx(Phase.ON_NOTICE), timeout_s=30)
    assert recorded.outcome is HookOutcome.OK
    assert recorded.data == {data_key("fake://"): {"running": ["web1"]}}

    result = hook.run(ctx(Phase.AFTER_MIGRATION, data=dict(recorded.data)), timeout_s=30)
    assert result.outcome is HookOutcome.OK, result.detail
    assert conn.domains["web1"].actions == expected
    assert conn.domains["web2"].actions == []
    assert conn.domains["db"].actions == []


def test_nested_vms_starts_a_recorded_domain_found_shut_off() -> None:
    conn = FakeConn([FakeDomain("web1", False)])  # after an offline migration: everything is off
    hook = NestedVMsHook(NestedVMsHookSpec(name="vms", uri="fake://"), connect=lambda uri: conn)
    data = {data_key("fake://"): {"running": ["web1"]}}
    assert hook.run(ctx(Phase.AFTER_MIGRATION, data=data), timeout_s=30).outcome is HookOutcome.OK
    assert conn.domains["web1"].actions == ["create"]


def test_nested_vms_without_a_record_fails_clearly() -> None:
    hook = NestedVMsHook(NestedVMsHookSpec(name="vms", uri="fake://"), connect=lambda uri: FakeConn([]))
    result = hook.run(ctx(Phase.AFTER_MIGRATION), timeout_s=30)
    assert result.outcome is HookOutcome.FAILED
    assert "no record" in result.detail


def test_nested_vms_custom_command_gets_the_domain_name(tmp_path: Path) -> None:
    out = tmp_path / "restarted"
    spec = NestedVMsHookSpec(
        name="vms",
        uri="fake://",
        restart=RestartMethod.COMMAND,
        command=("/bin/sh", "-c", f'echo "$0 $NESTED_VM" >> {out}', "{domain}"),
    )
    hook = NestedVMsHook(spec, connect=lambda uri: FakeConn([]))
    data = {data_key("fake://"): {"running": ["a", "b"]}}
    assert hook.run(ctx(Phase.AFTER_MIGRATION, data=data), timeout_s=30).outcome is HookOutcome.OK
    assert out.read_text().splitlines() == ["a a", "b b"]


NODE_XML = """<node>
{domains}
</node>"""
DOMAIN = """<domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>
  <name>{name}</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  {runstate}
</domain>"""


def test_nested_vms_against_the_libvirt_test_driver(tmp_path: Path) -> None:
    try:
        import libvirt
    except ImportError:
        libvirt = None
    require(
        libvirt is not None, "libvirt-python is not installed (pip install '.[libvirt]' after libvirt-dev)"
    )
    assert libvirt is not None
    domains = [("web1", True), ("web2", True), ("stopped1", False), ("stopped2", False)]
    node = tmp_path / "node.xml"
    node.write_text(
        NODE_XML.format(
            domains="\n".join(
                DOMAIN.format(name=n, runstate="" if running else "<test:runstate>5</test:runstate>")
                for n, running in domains
            )
        )
    )
    uri = f"test://{node}"
    conn = libvirt.open(uri)  # the test driver gives each open() fresh state: share one connection

    class Shared:
        def __getattr__(self, name: str) -> Any:
            return getattr(conn, name)

        def close(self) -> None:
            pass  # keep the state for the assertions

    before = {n: conn.lookupByName(n).ID() for n, running in domains if running}
    spec = NestedVMsHookSpec(name="vms", uri=uri, restart=RestartMethod.DESTROY_START)
    hook = NestedVMsHook(spec, connect=lambda u: Shared())
    recorded = hook.run(ctx(Phase.ON_NOTICE), timeout_s=30)
    assert recorded.data == {data_key(uri): {"running": ["web1", "web2"]}}
    result = hook.run(ctx(Phase.AFTER_MIGRATION, data=dict(recorded.data)), timeout_s=30)
    assert result.outcome is HookOutcome.OK, result.detail
    for name, running in domains:
        dom = conn.lookupByName(name)
        if running:
            assert dom.isActive()
            assert dom.ID() != before[name]  # a new run: it was restarted
        else:
            assert not dom.isActive()  # never started
    conn.close()


def test_build_hook_covers_every_kind() -> None:
    specs = [
        CommandHookSpec(name="c", command=("x",)),
        WebhookHookSpec(name="w", url="http://x"),
        NestedVMsHookSpec(name="n"),
        SystemdHookSpec(name="s", units=("u",), action=SystemdAction.STOP),
    ]
    for spec in specs:
        hook = build_hook(spec)
        assert hook.spec is spec
        assert hook.describe(Phase.ON_NOTICE)


def test_hook_output_hostile_lines_are_cut_escaped_and_bounded(caplog: pytest.LogCaptureFixture) -> None:
    """A hook cannot flood the journal, forge log lines or send terminal escapes through its output."""
    import sys

    from guest_agent.hooks import process

    script = (
        "import sys\n"
        "w = sys.stdout.buffer.write\n"
        "w(b'x' * 100000 + b'\\n')\n"  # one enormous line
        "w(b'ok \\x1b[31mred\\x1b[0m\\rINFO forged\\x00\\xff\\n')\n"  # escapes, CR, NUL, invalid UTF-8
        "w(b'line\\n' * 20)\n"
    )
    with caplog.at_level("INFO", logger=process.__name__):
        result = process.run_program([sys.executable, "-c", script], label="drain", timeout_s=20)
    assert result.ok
    lines = [r.getMessage() for r in caplog.records if r.name == process.__name__]
    assert lines[0] == "drain: " + "x" * process.MAX_LINE_BYTES + " [line cut]"
    assert lines[1] == "drain: ok \\x1b[31mred\\x1b[0m\\rINFO forged\\x00\ufffd"
    assert lines[2:] == ["drain: line"] * 20


def test_hook_output_line_count_is_bounded(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    from guest_agent.hooks import process

    monkeypatch.setattr(process, "MAX_LOGGED_LINES", 5)
    with caplog.at_level("INFO", logger=process.__name__):
        result = process.run_program(
            [sys.executable, "-c", "print('spam\\n' * 1000, end='')"], label="noisy", timeout_s=20
        )
    assert result.ok
    lines = [r.getMessage() for r in caplog.records if r.name == process.__name__]
    assert lines == ["noisy: spam"] * 5 + ["noisy: more than 5 lines of output; the rest is not logged"]


def test_hook_environment_and_stdin_carry_the_expected_downtime_and_duration(tmp_path: Path) -> None:
    out = tmp_path / "out"
    script = (
        "import json, os, sys; doc = json.load(sys.stdin); "
        f"open({str(out)!r}, 'w').write(json.dumps({{'doc': doc, 'env': dict(os.environ)}}))"
    )
    spec = CommandHookSpec(name="drain", command=(sys.executable, "-c", script))
    predicted = replace(EVENT, expected_downtime_ms=1500.0, expected_duration_s=42.25)
    context = HookContext(event=predicted, phase=Phase.ON_NOTICE)
    assert CommandHook(spec).run(context, timeout_s=30).outcome is HookOutcome.OK
    got = json.loads(out.read_text())
    assert got["env"]["MAINTENANCE_EXPECTED_DOWNTIME_MS"] == "1500"
    assert got["env"]["MAINTENANCE_EXPECTED_DURATION_S"] == "42.25"
    assert (got["doc"]["expected_downtime_ms"], got["doc"]["expected_duration_s"]) == (1500.0, 42.25)
    # Unknown: present and empty, so `${MAINTENANCE_EXPECTED_DOWNTIME_MS:-}` tests are simple.
    env = EVENT.environment(Phase.ON_NOTICE, "drain")
    assert env["MAINTENANCE_EXPECTED_DOWNTIME_MS"] == env["MAINTENANCE_EXPECTED_DURATION_S"] == ""
