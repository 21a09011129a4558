"""Predicting migrations with the simulator (issue 14).

- ``predict_migration``: one droplet, one source/target pair, the engine's controller, in a private
  ``SimWorld`` (nothing shared is touched): whether it converges, how long it takes, the downtime, the bytes,
  how long and how hard it is throttled, and a risk that it will not converge (``Risk``: the same migration
  with the droplet writing 1.5x faster, run too; a migration that only just converges is ``MEDIUM``).
- ``window``: the length of a maintenance window that runs predicted migrations under concurrency limits
  (list scheduling in plan order, as the executor starts them; links are not shared in the prediction, so
  it is a lower bound when many migrations share one NIC).

Calibrating the simulator from real migrations is ``host_engine.calibration``.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from host_engine.attempt import MigrationRun, Outcome, run_migration
from host_engine.controller import ControllerConfig
from host_engine.drivers.base import MigrationSpec
from host_engine.drivers.sim.driver import SimClock, SimHypervisor
from host_engine.drivers.sim.model import DEFAULT_STEP_S, HostModel, SimWorld
from host_engine.drivers.sim.workloads import DEFAULT_NIC_BPS, Workload

# A migration still running after this much simulated time is predicted not to converge (the bench bound).
DEFAULT_PREDICT_TIMEOUT_S = 600.0
# The margin a prediction is tested with: the droplet writing this much faster than its model says.
RISK_RATE_FACTOR = 1.5
DEFAULT_TICK_S = 0.25


class Risk(enum.Enum):
    LOW = "low"  # converges, and still would writing 1.5x faster
    MEDIUM = "medium"  # converges, but not writing 1.5x faster (or only under throttle)
    HIGH = "high"  # predicted not to converge


@dataclass(frozen=True)
class Link:
    """The path between two hosts as the sim sees it: the link speed and each end's host model."""

    link_bps: float = DEFAULT_NIC_BPS
    source: HostModel = field(default_factory=HostModel)
    target: HostModel = field(default_factory=HostModel)


@dataclass(frozen=True)
class Prediction:
    droplet_id: str
    converges: bool
    duration_s: float
    downtime_ms: float | None
    bytes_transferred: int
    throttle_pct_s: float
    throttled_s: float
    max_throttle_pct: int
    disk_limit_s: float
    risk: Risk
    outcome: str  # completed | aborted: <reason> | failed: <reason>

    def to_dict(self) -> dict[str, Any]:
        return {
            "droplet_id": self.droplet_id,
            "converges": self.converges,
            "duration_s": round(self.duration_s, 2),
            "downtime_ms": None if self.downtime_ms is None else round(self.downtime_ms, 1),
            "bytes_transferred": self.bytes_transferred,
            "throttle_pct_s": round(self.throttle_pct_s, 1),
            "throttled_s": round(self.throttled_s, 2),
            "max_throttle_pct": self.max_throttle_pct,
            "disk_limit_s": round(self.disk_limit_s, 2),
            "risk": self.risk.value,
            "outcome": self.outcome,
        }


def _simulate(
    droplet_id: str,
    memory_bytes: int,
    disk_bytes: int,
    workload: Workload,
    link: Link,
    cap_mibps: int,
    config: ControllerConfig,
    timeout_s: float,
    tick_s: float,
) -> Prediction:
    world = SimWorld(0, step_s=DEFAULT_STEP_S)
    world.add_host("source", nic_bps=link.link_bps)
    world.add_host("target", nic_bps=link.link_bps)
    world.host_models = {"source": link.source, "target": link.target}
    world.add_droplet(
        droplet_id,
        "source",
        memory_bytes=memory_bytes,
        disk_bytes=disk_bytes,
        workload=workload,
        disk_block_bytes=link.source.disk_block_bytes,
        memory_page_bytes=link.source.memory_page_bytes,
    )
    spec = MigrationSpec(
        f"predict-{droplet_id}",
        droplet_id,
        "source",
        "target",
        "sim://source",
        "sim://target",
        1,
        memory_bytes,
        disk_bytes,
        options={"bandwidth_mibps": str(cap_mibps)} if cap_mibps else {},
    )
    clock = SimClock(world)
    start = clock.now()
    throttled: list[float] = [0.0, 0.0, 0.0]  # seconds throttled, max %, last sample time

    def watch(p: Any) -> None:
        now = clock.now()
        if p.memory_throttle_pct > 0:
            throttled[0] += now - throttled[2]
            throttled[1] = max(throttled[1], p.memory_throttle_pct)
        throttled[2] = now

    def bound() -> str | None:
        return f"still running after {timeout_s:.0f} s" if clock.now() - start >= timeout_s else None

    throttled[2] = start
    result = run_migration(
        SimHypervisor(world).migration(spec),
        config,
        clock,
        tick_s=tick_s,
        on_progress=watch,
        should_abort=bound,
    )
    duration_s = result.duration_s
    if result.outcome is Outcome.COMPLETED:
        outcome = "completed"
        # The engine reads a real job's end as it happens (the libvirt driver's ``wait_ended``), not at its
        # next tick: so the prediction is the sim's job end too, not the tick that saw it (up to a tick, 10 %
        # of a 2.5 s migration at 0.25 s ticks, added to every prediction and to every fitted setup time).
        mig = world.migration(spec.migration_id)
        if mig is not None and mig.ended_at_s is not None:
            duration_s = mig.ended_at_s - start
    elif result.outcome is Outcome.ABORTED:
        why = result.abort_reason.value if result.abort_reason is not None else result.reason
        outcome = f"aborted: {why}"
    else:
        outcome = f"failed: {result.reason}"
    return Prediction(
        droplet_id=droplet_id,
        converges=result.outcome is Outcome.COMPLETED,
        duration_s=duration_s,
        downtime_ms=result.downtime_ms,
        bytes_transferred=result.bytes_transferred,
        throttle_pct_s=result.throttle_pct_s,
        throttled_s=throttled[0],
        max_throttle_pct=int(throttled[1]),
        disk_limit_s=result.disk_limit_s,
        risk=Risk.LOW,
        outcome=outcome,
    )


def predict_migration(
    droplet_id: str,
    *,
    memory_bytes: int,
    disk_bytes: int,
    workload: Workload,
    link: Link | None = None,
    cap_mibps: int = 0,
    config: ControllerConfig | None = None,
    timeout_s: float = DEFAULT_PREDICT_TIMEOUT_S,
    tick_s: float = DEFAULT_TICK_S,
    assess_risk: bool = True,
) -> Prediction:
    """What the engine's migration of this droplet will do, by simulating it (deterministic)."""
    link = link or Link()
    config = config or ControllerConfig()
    args = (memory_bytes, disk_bytes)
    p = _simulate(droplet_id, *args, workload, link, cap_mibps, config, timeout_s, tick_s)
    if not p.converges:
        return replace(p, risk=Risk.HIGH)
    if not assess_risk:
        return p
    faster = replace(
        workload,
        memory_rate_bps=workload.memory_rate_bps * RISK_RATE_FACTOR,
        disk_rate_bps=workload.disk_rate_bps * RISK_RATE_FACTOR,
    )
    q = _simulate(droplet_id, *args, faster, link, cap_mibps, config, timeout_s, tick_s)
    risky = not q.converges or p.throttle_pct_s > 0
    return replace(p, risk=Risk.MEDIUM if risky else Risk.LOW)


# ---- the window --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scheduled:
    droplet_id: str
    source_host: str
    target_host: str
    start_s: float
    end_s: float


def window(
    moves: Sequence[tuple[str, str, str, float]],
    *,
    max_concurrent: int,
    max_per_host: int,
) -> tuple[float, list[Scheduled]]:
    """The window's length when ``moves`` (droplet, source, target, predicted duration) start in order as
    soon as the limits allow (at most ``max_concurrent`` at once, ``max_per_host`` per host).

    >>> window([("a", "h1", "h2", 10.0), ("b", "h1", "h3", 5.0)], max_concurrent=4, max_per_host=1)[0]
    15.0
    """
    if max_concurrent < 1 or max_per_host < 1:
        raise ValueError("limits must be at least 1")
    running: list[Scheduled] = []
    done: list[Scheduled] = []
    now = 0.0
    for droplet_id, source, target, duration_s in moves:
        while True:
            busy = [s for s in running if s.end_s > now]
            per_host: dict[str, int] = {}
            for s in busy:
                for h in (s.source_host, s.target_host):
                    per_host[h] = per_host.get(h, 0) + 1
            if (
                len(busy) < max_concurrent
                and per_host.get(source, 0) < max_per_host
                and per_host.get(target, 0) < max_per_host
            ):
                break
            now = min(s.end_s for s in busy)
        running = [s for s in running if s.end_s > now]
        item = Scheduled(droplet_id, source, target, now, now + max(0.0, duration_s))
        running.append(item)
        done.append(item)
    return max((s.end_s for s in done), default=0.0), done


# ---- calibration -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Forecast:
    """Every planned move's prediction and the window they need under the limits."""

    predictions: tuple[tuple[str, str, str, Prediction], ...]  # (droplet, source, target, prediction)
    schedule: tuple[Scheduled, ...]
    window_s: float
    max_parallel: int
    max_per_host: int

    def to_dict(self) -> dict[str, Any]:
        starts = {s.droplet_id: s for s in self.schedule}
        return {
            "window_s": round(self.window_s, 1),
            "limits": {"max_parallel": self.max_parallel, "max_per_host": self.max_per_host},
            "droplets": [
                {
                    **p.to_dict(),
                    "source": source,
                    "target": target,
                    "starts_after_s": round(starts[d].start_s, 1),
                }
                for d, source, target, p in self.predictions
            ],
        }


def forecast(
    moves: Sequence[tuple[str, str, str, int, int]],
    settings: Any,
    *,
    config: ControllerConfig | None = None,
    cap_mibps: int = 0,
    max_parallel: int = 4,
    max_per_host: int = 2,
) -> Forecast:
    """Predict each move (droplet, source, target, memory bytes, disk bytes) with ``settings``
    (``SimSettings``: each droplet's workload, each host's link and costs) and lay them in a window."""
    predictions = []
    for droplet_id, source, target, memory_bytes, disk_bytes in moves:
        src, dst = settings.host(source), settings.host(target)
        link = Link(min(src.link_bps, dst.link_bps), src.model, dst.model)
        p = predict_migration(
            droplet_id,
            memory_bytes=memory_bytes,
            disk_bytes=disk_bytes,
            workload=settings.workload(droplet_id),
            link=link,
            cap_mibps=cap_mibps,
            config=config,
        )
        predictions.append((droplet_id, source, target, p))
    length, schedule = window(
        [(d, s, t, p.duration_s) for d, s, t, p in predictions],
        max_concurrent=max_parallel,
        max_per_host=max_per_host,
    )
    return Forecast(tuple(predictions), tuple(schedule), length, max_parallel, max_per_host)


def forecast_shared(
    moves: Sequence[tuple[str, str, str, int, int]],
    settings: Any,
    *,
    config: ControllerConfig | None = None,
    cap_mibps: int = 0,
    max_parallel: int = 4,
    max_per_host: int = 2,
    tick_s: float = DEFAULT_TICK_S,
    timeout_s: float = DEFAULT_PREDICT_TIMEOUT_S,
) -> Forecast:
    """The whole evacuation in one simulated world: moves start in order as the limits allow and share each
    host's link while they overlap (what ``forecast`` leaves out). Risk is ``HIGH`` for a move predicted not
    to converge and ``MEDIUM`` for one that needs the throttle."""
    if max_parallel < 1 or max_per_host < 1:
        raise ValueError("limits must be at least 1")
    config = config or ControllerConfig()
    world = _world_for(moves, settings)
    clock = SimClock(world)
    start = clock.now()
    hv = SimHypervisor(world)
    pending = list(moves)
    running: dict[str, tuple[Any, str, str, float]] = {}
    ended: dict[str, tuple[Any, float, float]] = {}  # droplet -> (result, start, end)
    limit_s = timeout_s * max(1, len(moves))
    while (pending or running) and clock.now() - start < limit_s:
        busy: dict[str, int] = {}
        for _run, s, t, _at in running.values():
            busy[s] = busy.get(s, 0) + 1
            busy[t] = busy.get(t, 0) + 1
        while pending and len(running) < max_parallel:
            d, s, t, memory_bytes, disk_bytes = pending[0]
            if busy.get(s, 0) >= max_per_host or busy.get(t, 0) >= max_per_host:
                break
            pending.pop(0)
            spec = MigrationSpec(
                f"predict-{d}", d, s, t, f"sim://{s}", f"sim://{t}", 1, memory_bytes, disk_bytes,
                options={"bandwidth_mibps": str(cap_mibps)} if cap_mibps else {},
            )  # fmt: skip
            began = clock.now()

            def bound(began: float = began) -> str | None:
                return f"still running after {timeout_s:.0f} s" if clock.now() - began >= timeout_s else None

            run = MigrationRun(hv.migration(spec), config, clock, should_abort=bound, keep_trace=False)
            running[d] = (run, s, t, began)
            busy[s] = busy.get(s, 0) + 1
            busy[t] = busy.get(t, 0) + 1
            if not run.begin() and run.result is not None:
                ended[d] = (run.result, began, clock.now())
                del running[d]
        for d, (run, _s, _t, began) in list(running.items()):
            r = run.step()
            if r is not None:
                ended[d] = (r, began, clock.now())
                del running[d]
        if running:
            clock.sleep(tick_s)
    predictions = []
    schedule = []
    for d, s, t, _m, _k in moves:
        if d not in ended:
            continue
        r, began, end = ended[d]
        predictions.append((d, s, t, _prediction_of(d, r)))
        schedule.append(Scheduled(d, s, t, began - start, end - start))
    length = max((x.end_s for x in schedule), default=0.0)
    return Forecast(tuple(predictions), tuple(schedule), length, max_parallel, max_per_host)


def _world_for(moves: Sequence[tuple[str, str, str, int, int]], settings: Any) -> SimWorld:
    world = SimWorld(0, step_s=DEFAULT_STEP_S)
    for host in sorted({h for _d, s, t, _m, _k in moves for h in (s, t)}):
        world.add_host(host, nic_bps=settings.host(host).link_bps)
        world.host_models[host] = settings.host(host).model
    for droplet_id, source, _t, memory_bytes, disk_bytes in moves:
        world.add_droplet(
            droplet_id,
            source,
            memory_bytes=memory_bytes,
            disk_bytes=disk_bytes,
            workload=settings.workload(droplet_id),
        )
    return world


def _prediction_of(droplet_id: str, r: Any) -> Prediction:
    converges = r.outcome is Outcome.COMPLETED
    risk = Risk.LOW if converges and r.throttle_pct_s == 0 else Risk.MEDIUM if converges else Risk.HIGH
    return Prediction(
        droplet_id=droplet_id,
        converges=converges,
        duration_s=r.duration_s,
        downtime_ms=r.downtime_ms,
        bytes_transferred=r.bytes_transferred,
        throttle_pct_s=r.throttle_pct_s,
        throttled_s=0.0,
        max_throttle_pct=0,
        disk_limit_s=r.disk_limit_s,
        risk=risk,
        outcome="completed" if converges else f"{r.outcome.value}: {r.reason}",
    )
