"""Fixtures for the guest agent's unit tests: a fake clock, recording hooks, a fake event source."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest

from guest_agent.agent import Agent
from guest_agent.config import AgentConfig, HookSpec, Phase, parse_config
from guest_agent.errors import MetadataUnreachable
from guest_agent.hooks.base import HookContext, HookResult
from guest_agent.journal import Journal
from guest_agent.source import Notice, NoticeKind
from guest_sdk import AckAction

T0 = 1_800_000_000.0


class FakeClock:
    """Wall and monotonic time that move only when a test (or an injected sleep) says so."""

    def __init__(self) -> None:
        self.now = T0
        self.mono = 1000.0

    def wall(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.mono

    def sleep(self, seconds: float) -> None:
        self.advance(seconds)

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.mono += seconds

    def in_s(self, seconds: float) -> datetime:
        return datetime.fromtimestamp(self.now + seconds, UTC)


@dataclass
class Call:
    event_id: str
    phase: Phase
    name: str
    timeout_s: float
    env: dict[str, str]


Behaviour = Callable[[HookContext, float], HookResult]


@dataclass
class Recorder:
    """Builds fake hooks that record each run; ``behaviour[name]`` decides a hook's result."""

    clock: FakeClock
    calls: list[Call] = field(default_factory=list)
    behaviour: dict[str, Behaviour] = field(default_factory=dict)

    def factory(self, spec: HookSpec) -> FakeHook:
        return FakeHook(spec, self)

    def names(self, phase: Phase | None = None) -> list[str]:
        return [c.name for c in self.calls if phase is None or c.phase is phase]


class FakeHook:
    def __init__(self, spec: HookSpec, recorder: Recorder) -> None:
        self.spec = spec
        self._recorder = recorder

    def describe(self, phase: Phase) -> str:
        return f"fake {self.spec.name}"

    def run(self, ctx: HookContext, timeout_s: float) -> HookResult:
        self._recorder.calls.append(
            Call(
                ctx.event.event_id,
                ctx.phase,
                self.spec.name,
                timeout_s,
                ctx.event.environment(ctx.phase, "x"),
            )
        )
        behaviour = self._recorder.behaviour.get(self.spec.name)
        if behaviour is not None:
            return behaviour(ctx, timeout_s)
        self._recorder.clock.advance(1.0)
        return HookResult.ok("fine")


@dataclass
class FakeSource:
    acks: list[tuple[str, str, bool]] = field(default_factory=list)
    ack_errors: list[Exception] = field(default_factory=list)  # raised in order, then success

    def changes(self, stop: threading.Event) -> Iterator[Notice]:  # pragma: no cover - not used by Agent
        raise MetadataUnreachable("fake")

    def current(self) -> Notice:  # pragma: no cover
        raise MetadataUnreachable("fake")

    def acknowledge(self, event_id: str, action: AckAction, *, power_on_after: bool) -> None:
        if self.ack_errors:
            raise self.ack_errors.pop(0)
        self.acks.append((event_id, action.value, power_on_after))  # the agent passes the SDK's enum

    def close(self) -> None:
        pass


def live(event_id: str = "ev-1", *, deadline: datetime | None = None) -> Notice:
    return Notice(NoticeKind.LIVE_MIGRATE, "live_migrate", event_id, "scheduled", deadline, deadline)


def offline(event_id: str = "ev-2", *, deadline: datetime | None = None) -> Notice:
    return Notice(NoticeKind.OFFLINE_MIGRATE, "offline_migrate", event_id, "scheduled", deadline, deadline)


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
[[on_notice]]
name = "tell-lb"
type = "webhook"
url = "http://127.0.0.1:1/hook"
[[before_offline]]
name = "stop-app"
command = ["stop-app"]
[[after_migration]]
name = "restore"
command = ["restore"]
"""


@dataclass
class World:
    """An agent wired to fakes, and what it did."""

    tmp_path: Path
    clock: FakeClock
    recorder: Recorder
    source: FakeSource
    config: AgentConfig
    power_offs: list[float]
    agent: Agent

    @property
    def journal_path(self) -> Path:
        return self.tmp_path / "journal.json"

    def restart(self) -> Agent:
        """A new agent process: fresh objects, the same journal file."""
        self.agent = make_agent(self)
        return self.agent


def make_agent(w: World, *, sleep: Callable[[float], None] | None = None) -> Agent:
    def power_off(timeout_s: float) -> HookResult:
        w.power_offs.append(timeout_s)
        return HookResult.ok("powered off (fake)")

    return Agent(
        w.config,
        Journal.open(w.journal_path, wall=w.clock.wall),
        source=w.source,
        hook_factory=w.recorder.factory,
        power_off=power_off,
        wall=w.clock.wall,
        monotonic=w.clock.monotonic,
        sleep=sleep or w.clock.sleep,
    )


@pytest.fixture
def world_factory(tmp_path: Path) -> Callable[..., World]:
    def build(policy: str = "", config_text: str | None = None) -> World:
        clock = FakeClock()
        text = (config_text or CONFIG).format(journal=tmp_path / "journal.json", policy=policy)
        config = parse_config(text, environ={})
        w = World(tmp_path, clock, Recorder(clock), FakeSource(), config, [], None)  # type: ignore[arg-type]
        w.agent = make_agent(w)
        return w

    return build


@pytest.fixture
def world(world_factory: Callable[..., World]) -> World:
    return world_factory()


def fail(detail: str = "boom") -> Behaviour:
    return lambda ctx, timeout_s: HookResult.failed(detail)
