"""Predicting migrations with the simulator (issue 14).

- ``predict_migration``: one droplet, one source/target pair, the engine's controller, in a private
  ``SimWorld`` (nothing shared is touched): whether it converges, how long it takes, the downtime, the bytes,
  how long and how hard it is throttled, and a risk that it will not converge (``Risk``: the same migration
  with the droplet writing 1.5x faster, run too; a migration that only just converges is ``MEDIUM``).
- ``window``: the length of a maintenance window that runs predicted migrations under concurrency limits
  (list scheduling in plan order, as the executor starts them; links are not shared in the prediction, so
  it is a lower bound when many migrations share one NIC).
- ``forecast_shared``: the whole evacuation in one simulated world, as the executor runs it: the same
  ``[concurrency]`` limits (``Limits``: at once, out of one source, into one target, each on its own), the
  same controller tick, moves started in plan order as soon as they fit, overlapping moves sharing each
  host's link.

Each move of an evacuation predicted from one shared run, in the executor's order and the planner's
windows, with its risk and the fallback to ``predict_migration``, is ``host_engine.evacuation_forecast``
(``plan evacuate --predict``, ``evacuate --predict``). Calibrating the simulator from real migrations is
``host_engine.calibration``.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from host_engine.attempt import MigrationRun, Outcome, run_migration
from host_engine.controller import ControllerConfig
from host_engine.drivers.base import MigrationSpec
from host_engine.drivers.sim.driver import SimClock, SimHypervisor
from host_engine.drivers.sim.model import DEFAULT_STEP_S, HostModel, SimWorld
from host_engine.drivers.sim.workloads import DEFAULT_NIC_BPS, Workload

if TYPE_CHECKING:
    from host_engine.config import EngineConfig

# A migration still running after this much simulated time is predicted not to converge (the bench bound).
DEFAULT_PREDICT_TIMEOUT_S = 600.0
# The margin a prediction is tested with: the droplet writing this much faster than its model says.
RISK_RATE_FACTOR = 1.5
DEFAULT_TICK_S = 0.25


class Risk(enum.Enum):
    LOW = "low"  # converges, and still would writing 1.5x faster
    MEDIUM = "medium"  # converges, but not writing 1.5x faster (or only under throttle)
    HIGH = "high"  # predicted not to converge


class Basis(enum.Enum):
    """What a prediction simulated: the move with the moves the plan runs beside it sharing each host's
    link (``forecast_shared``), or the move alone on its link (``predict_migration``)."""

    SHARED = "shared"
    ALONE = "alone"


@dataclass(frozen=True)
class Link:
    """The path between two hosts as the sim sees it: the link speed and each end's host model."""

    link_bps: float = DEFAULT_NIC_BPS
    source: HostModel = field(default_factory=HostModel)
    target: HostModel = field(default_factory=HostModel)


@dataclass(frozen=True)
class Limits:
    """How many migrations run at once, as the executor's claims allow (``[concurrency]``, and what one
    worker drives, ``[engine] max_concurrent``): fleet-wide, out of one source, into one target.

    An evacuation moves everything out of one host, so ``max_per_source`` is what shares that host's link:
    a forecast that held the source to ``max_per_target`` (as the demo's did, 2 where the executor ran 3)
    gave each copy half the NIC where it got a third, and predicted every duration about a third short."""

    max_parallel: int = 4
    max_per_source: int = 2
    max_per_target: int = 2

    def __post_init__(self) -> None:
        if min(self.max_parallel, self.max_per_source, self.max_per_target) < 1:
            raise ValueError("limits must be at least 1")

    @classmethod
    def of(cls, config: EngineConfig, *, workers: int | None = None) -> Limits:
        """``config``'s (``EngineConfig``) limits; ``workers``: how many ``host-engine run`` share them (each
        drives at most ``[engine] max_concurrent``); None: as many as it takes to reach ``max_parallel``."""
        sched = config.schedule
        parallel = sched.max_parallel
        if workers is not None:
            parallel = min(parallel, workers * config.engine.max_concurrent)
        return cls(max(1, parallel), max(1, sched.max_per_source), max(1, sched.max_per_target))

    def to_dict(self) -> dict[str, int]:
        return {
            "max_parallel": self.max_parallel,
            "max_per_source": self.max_per_source,
            "max_per_target": self.max_per_target,
        }

    def describe(self) -> str:
        return (
            f"at most {self.max_parallel} at once, {self.max_per_source} out of a host, "
            f"{self.max_per_target} into a host"
        )

    def admits(self, running: Sequence[tuple[str, str]], source: str, target: str) -> bool:
        """Whether a move ``source`` -> ``target`` may start beside ``running`` (their source, target)."""
        if len(running) >= self.max_parallel:
            return False
        out = sum(1 for s, _t in running if s == source)
        into = sum(1 for _s, t in running if t == target)
        return out < self.max_per_source and into < self.max_per_target


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
    basis: Basis = Basis.ALONE
    note: str = ""  # why a move of a shared forecast was predicted alone (and anything else to say)

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
            "basis": self.basis.value,
            "note": self.note or None,
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


def window(moves: Sequence[tuple[str, str, str, float]], *, limits: Limits) -> tuple[float, list[Scheduled]]:
    """The window's length when ``moves`` (droplet, source, target, predicted duration) start in plan order
    as soon as ``limits`` allow; a move that does not fit yet does not hold back a later one that does (the
    executor's claims skip it too).

    >>> window([("a", "h1", "h2", 10.0), ("b", "h1", "h3", 5.0)], limits=Limits(4, 1, 1))[0]
    15.0
    """
    pending = list(moves)
    running: list[Scheduled] = []
    done: list[Scheduled] = []
    now = 0.0
    while pending:
        running = [s for s in running if s.end_s > now]
        for move in list(pending):
            droplet_id, source, target, duration_s = move
            if limits.admits([(s.source_host, s.target_host) for s in running], source, target):
                item = Scheduled(droplet_id, source, target, now, now + max(0.0, duration_s))
                running.append(item)
                done.append(item)
                pending.remove(move)
        if pending:  # something runs: with nothing running, every limit (>= 1) admits a move
            now = min(s.end_s for s in running)
    return max((s.end_s for s in done), default=0.0), done


# ---- forecasts ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Forecast:
    """Every planned move's prediction and the window they need under the limits."""

    predictions: tuple[tuple[str, str, str, Prediction], ...]  # (droplet, source, target, prediction)
    schedule: tuple[Scheduled, ...]
    window_s: float
    limits: Limits

    def to_dict(self) -> dict[str, Any]:
        starts = {s.droplet_id: s for s in self.schedule}
        return {
            "window_s": round(self.window_s, 2),  # as each move's duration_s: never shorter than one
            "limits": self.limits.to_dict(),
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
    limits: Limits | None = None,
    tick_s: float = DEFAULT_TICK_S,
) -> Forecast:
    """Predict each move (droplet, source, target, memory bytes, disk bytes) on its own with ``settings``
    (``SimSettings``: each droplet's workload, each host's link and costs), the controller ticking every
    ``tick_s``, and lay them in a window under ``limits`` (links not shared: see ``forecast_shared``)."""
    limits = limits or Limits()
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
            tick_s=tick_s,
        )
        predictions.append((droplet_id, source, target, p))
    length, schedule = window([(d, s, t, p.duration_s) for d, s, t, p in predictions], limits=limits)
    return Forecast(tuple(predictions), tuple(schedule), length, limits)


@dataclass
class _Shared:
    """One move of a shared forecast while it runs: its attempt, when it began, how it was throttled."""

    run: MigrationRun
    source: str
    target: str
    began: float
    throttled_s: float = 0.0
    max_throttle_pct: int = 0
    last_at: float = 0.0
    last_pct: int = 0
    started: bool = False


def forecast_shared(
    moves: Sequence[tuple[str, str, str, int, int]],
    settings: Any,
    *,
    config: ControllerConfig | None = None,
    cap_mibps: int = 0,
    limits: Limits | None = None,
    tick_s: float = DEFAULT_TICK_S,
    timeout_s: float = DEFAULT_PREDICT_TIMEOUT_S,
    seed: int = 0,
    opens_s: Mapping[str, float] | None = None,
) -> Forecast:
    """The whole evacuation in one simulated world, as the executor runs it: every controller tick
    (``tick_s``, the executor's) each running move is stepped, and the moves not started yet start in plan
    order as soon as ``limits`` admit them (a blocked one does not hold back a later one that fits; a freed
    slot is taken at the next tick), sharing each host's link while they overlap (what ``forecast`` leaves
    out). A move's duration is from its start to the end of its job (the sim's executor records it at its
    next tick, up to ``tick_s`` later; libvirt's as it happens). Risk is ``HIGH`` for a move predicted not
    to converge and ``MEDIUM`` for one that needs the throttle.

    ``seed`` is the simulated world's: where each droplet's hot sets lie and which pages a random writer
    hits next come from it (one stream per droplet). A guest rewriting a random hot set pauses for a
    remainder that varies with the stream (the demo's ``web`` guests: 42 to 77 ms over three seeds, the
    duration within 1 %), so a forecast of simulated hosts uses their world's seed; for real hosts that
    spread is part of the prediction's error.

    ``opens_s``: when each droplet's window opens, in seconds after the forecast starts (the plan's spaced
    ``not_before``; absent: at once). The executor claims no migration before its window, so neither does
    the forecast; give ``moves`` in the order the executor claims them (by window, then migration id).
    Every move is predicted (``Basis.SHARED``): each one ends within ``timeout_s`` of its start, so the run
    ends once the last window has opened and every move it admitted has ended."""
    limits = limits or Limits()
    opens = dict(opens_s or {})
    config = config or ControllerConfig()
    world = _world_for(moves, settings, seed)
    clock = SimClock(world)
    start = clock.now()
    hv = SimHypervisor(world)
    pending = list(moves)
    running: dict[str, _Shared] = {}
    ended: dict[str, tuple[Any, _Shared, float]] = {}  # droplet -> (result, its move, job end)
    limit_s = max(opens.values(), default=0.0) + timeout_s * max(1, len(moves))

    def finish(d: str, m: _Shared, result: Any) -> None:
        mig = world.migration(f"predict-{d}")
        job_end = mig.ended_at_s if mig is not None and mig.ended_at_s is not None else clock.now()
        ended[d] = (result, m, job_end if result.outcome is Outcome.COMPLETED else clock.now())
        del running[d]

    # Pending moves are looked at again only once something changed: a move ended (its slot is taken at
    # the next tick, as the executor's next claim takes it) or a window opened. Scanning all of them every
    # tick cost a 200-move forecast a fifth of its time.
    next_scan_s = 0.0
    while (pending or running) and clock.now() - start < limit_s:
        if pending and clock.now() - start + 1e-9 >= next_scan_s:
            for move in list(pending):
                d, s, t, _memory_bytes, _disk_bytes = move
                if opens.get(d, 0.0) > clock.now() - start + 1e-9:
                    continue
                if not limits.admits([(m.source, m.target) for m in running.values()], s, t):
                    continue
                pending.remove(move)
                m = running[d] = _begin(hv, clock, config, move, cap_mibps, timeout_s)
                if not m.started and m.run.result is not None:
                    finish(d, m, m.run.result)
            next_scan_s = _next_open(pending, opens, clock.now() - start)
        for d, m in list(running.items()):
            r = m.run.step()
            if r is not None:
                finish(d, m, r)
                next_scan_s = 0.0
        if running or not pending or not math.isfinite(next_scan_s) or next_scan_s <= clock.now() - start:
            clock.sleep(tick_s)
        else:  # nothing runs until the next window opens: on to the first tick at or after it
            gap_s = next_scan_s - (clock.now() - start)
            clock.sleep(tick_s * max(1, math.ceil(gap_s / tick_s - 1e-9)))
    predictions = []
    schedule = []
    for d, s, t, _m, _k in moves:
        if d not in ended:
            continue
        r, m, end = ended[d]
        predictions.append((d, s, t, _prediction_of(d, r, m, end - m.began)))
        schedule.append(Scheduled(d, s, t, m.began - start, end - start))
    length = max((x.end_s for x in schedule), default=0.0)
    return Forecast(tuple(predictions), tuple(schedule), length, limits)


def _begin(
    hv: SimHypervisor,
    clock: SimClock,
    config: ControllerConfig,
    move: tuple[str, str, str, int, int],
    cap_mibps: int,
    timeout_s: float,
) -> _Shared:
    """Start ``move``'s attempt now (``started`` False: it ended as it began, its result set)."""
    d, s, t, memory_bytes, disk_bytes = move
    spec = MigrationSpec(
        f"predict-{d}", d, s, t, f"sim://{s}", f"sim://{t}", 1, memory_bytes, disk_bytes,
        options={"bandwidth_mibps": str(cap_mibps)} if cap_mibps else {},
    )  # fmt: skip
    began = clock.now()

    def bound() -> str | None:
        return f"still running after {timeout_s:.0f} s" if clock.now() - began >= timeout_s else None

    run = MigrationRun(hv.migration(spec), config, clock, should_abort=bound, keep_trace=False)
    m = _Shared(run, s, t, began, last_at=began)
    run.on_progress = lambda p: _watch(m, p, clock.now())
    m.started = run.begin()
    return m


def _next_open(
    pending: Sequence[tuple[str, str, str, int, int]], opens: Mapping[str, float], at_s: float
) -> float:
    """When the next pending move's window opens after ``at_s`` (infinity: every window is open)."""
    return min((o for o in (opens.get(m[0], 0.0) for m in pending) if o > at_s + 1e-9), default=math.inf)


def _watch(m: _Shared, p: Any, now: float) -> None:
    if m.last_pct > 0:
        m.throttled_s += now - m.last_at
    m.last_at, m.last_pct = now, int(p.memory_throttle_pct)
    m.max_throttle_pct = max(m.max_throttle_pct, m.last_pct)


def _world_for(moves: Sequence[tuple[str, str, str, int, int]], settings: Any, seed: int = 0) -> SimWorld:
    world = SimWorld(seed, step_s=DEFAULT_STEP_S)
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


def _prediction_of(droplet_id: str, r: Any, m: _Shared, duration_s: float) -> Prediction:
    converges = r.outcome is Outcome.COMPLETED
    risk = Risk.LOW if converges and r.throttle_pct_s == 0 else Risk.MEDIUM if converges else Risk.HIGH
    return Prediction(
        droplet_id=droplet_id,
        converges=converges,
        duration_s=duration_s,
        downtime_ms=r.downtime_ms,
        bytes_transferred=r.bytes_transferred,
        throttle_pct_s=r.throttle_pct_s,
        throttled_s=m.throttled_s,
        max_throttle_pct=m.max_throttle_pct,
        disk_limit_s=r.disk_limit_s,
        risk=risk,
        outcome="completed" if converges else f"{r.outcome.value}: {r.reason}",
        basis=Basis.SHARED,
    )
