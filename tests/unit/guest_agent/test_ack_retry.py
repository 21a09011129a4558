"""The ack ``offline`` while the metadata server is down: bounded, jittered retries (guest_sdk.retry), then
the agent powers off anyway; a refusal is never retried; a stop request leaves the ack for the next start."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from guest_agent.config import Phase, parse_config
from guest_agent.errors import AckRejected, MetadataUnreachable
from guest_agent.journal import HookOutcome
from guest_agent.shutdown import ACK_RETRY
from guest_sdk import AckAction

from .conftest import CONFIG, FakeClock, FakeSource, Recorder, World, make_agent, offline


@dataclass
class DownSource(FakeSource):
    """A metadata server that answers the ack with ``errors`` in order, noting when each attempt came."""

    clock: FakeClock = field(default_factory=FakeClock)
    attempts_at: list[float] = field(default_factory=list)

    def acknowledge(self, event_id: str, action: AckAction, *, power_on_after: bool) -> None:
        self.attempts_at.append(self.clock.monotonic())
        super().acknowledge(event_id, action, power_on_after=power_on_after)


class SignalledClock(FakeClock):
    """A fake clock that runs ``on_sleep`` whenever the agent sleeps (a signal arriving during a wait)."""

    def __init__(self) -> None:
        super().__init__()
        self.on_sleep: Callable[[], None] = lambda: None

    def sleep(self, seconds: float) -> None:
        self.on_sleep()
        super().sleep(seconds)


def world_with(
    tmp_path: Path, errors: list[Exception], clock: FakeClock | None = None
) -> tuple[World, DownSource]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    clock = clock or FakeClock()
    source = DownSource(ack_errors=list(errors), clock=clock)
    config = parse_config(CONFIG.format(journal=tmp_path / "journal.json", policy=""), environ={})
    w = World(tmp_path, clock, Recorder(clock), source, config, [], None)  # type: ignore[arg-type]
    w.agent = make_agent(w)
    return w, source


def ack_outcome(w: World, event_id: str) -> HookOutcome | None:
    ev = w.agent.journal.event(event_id)
    rec = ev.hook(Phase.BEFORE_OFFLINE, "@ack-offline") if ev else None
    return rec.outcome if rec else None


def test_ack_offline_retries_are_bounded_and_jittered_then_it_powers_off(tmp_path: Path) -> None:
    gaps_of_runs = []
    for run in range(3):
        w, source = world_with(tmp_path / str(run), [MetadataUnreachable("connection refused")] * 50)
        w.agent.handle(offline("ev-2"))
        assert len(w.power_offs) == 1  # the engine treats a droplet found shut off as offline
        assert ack_outcome(w, "ev-2") is HookOutcome.FAILED
        times = source.attempts_at
        assert 2 <= len(times) <= ACK_RETRY.attempts
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert all(0 < g <= ACK_RETRY.max_backoff_s for g in gaps), gaps
        assert times[-1] - times[0] <= 15.0  # never longer than the fixed 1+2+4+8 s it replaced
        gaps_of_runs.append(gaps)
    # Jittered: three droplets whose server went down together do not retry in the same instants.
    assert len({tuple(g) for g in gaps_of_runs}) == 3, gaps_of_runs


def test_ack_offline_recovers_after_an_outage(tmp_path: Path) -> None:
    w, source = world_with(tmp_path, [MetadataUnreachable("down")] * 2)
    w.agent.handle(offline("ev-2"))
    assert source.acks == [("ev-2", "offline", True)] and len(source.attempts_at) == 3
    assert ack_outcome(w, "ev-2") is HookOutcome.OK and len(w.power_offs) == 1


def test_a_refused_ack_is_not_retried_and_nothing_is_powered_off(tmp_path: Path) -> None:
    w, source = world_with(tmp_path, [AckRejected("409: not the current event")])
    w.agent.handle(offline("ev-2"))
    assert len(source.attempts_at) == 1 and w.power_offs == []
    assert ack_outcome(w, "ev-2") is HookOutcome.FAILED


def test_a_stop_request_during_the_retries_leaves_the_ack_for_the_next_start(tmp_path: Path) -> None:
    clock = SignalledClock()
    w, source = world_with(tmp_path, [MetadataUnreachable("down")] * 50, clock)
    clock.on_sleep = w.agent.request_stop  # SIGTERM arrives during the first wait
    w.agent.handle(offline("ev-2"))
    assert len(source.attempts_at) == 2 and w.power_offs == []
    assert ack_outcome(w, "ev-2") is None  # started, not finished: sent again after the restart
    source.ack_errors.clear()
    w.restart().handle(offline("ev-2"))
    assert source.acks == [("ev-2", "offline", True)] and len(w.power_offs) == 1
