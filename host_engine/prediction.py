"""Predicting migrations with the simulator, and calibrating it from real ones (issue 14).

- ``predict_migration``: one droplet, one source/target pair, the engine's controller, in a private
  ``SimWorld`` (nothing shared is touched): whether it converges, how long it takes, the downtime, the bytes,
  how long and how hard it is throttled, and a risk that it will not converge (``Risk``: the same migration
  with the droplet writing 1.5x faster, run too; a migration that only just converges is ``MEDIUM``).
- ``window``: the length of a maintenance window that runs predicted migrations under concurrency limits
  (list scheduling in plan order, as the executor starts them; links are not shared in the prediction, so
  it is a lower bound when many migrations share one NIC).
- ``calibrate``: a host model (link throughput, fixed costs, switchover cost) and per-droplet workloads
  (dirty rates, hot sets, resident memory, allocated disk) fitted from the progress samples the engine
  records for real migrations (``RecordedRun``), so a fleet's sim learns from that fleet.
"""

from __future__ import annotations

import enum
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from host_engine.attempt import MigrationRun, Outcome, run_migration
from host_engine.controller import ControllerConfig
from host_engine.drivers.base import MigrationSpec
from host_engine.drivers.sim.driver import SimClock, SimHypervisor
from host_engine.drivers.sim.model import DEFAULT_STEP_S, HostModel, SimWorld
from host_engine.drivers.sim.workloads import DEFAULT_NIC_BPS, Pattern, Workload

# A migration still running after this much simulated time is predicted not to converge (the bench bound).
DEFAULT_PREDICT_TIMEOUT_S = 600.0
# The margin a prediction is tested with: the droplet writing this much faster than its model says.
RISK_RATE_FACTOR = 1.5
DEFAULT_TICK_S = 0.25
# In the calibration's loss, a downtime this far off weighs as much as a total time off by a factor e: real
# downtimes of the same guest differ by up to ~100 ms on the harness, so it must not drown bytes and time.
DOWNTIME_LOSS_SCALE_MS = 200.0
# How many of the best workloads (by bytes and time) the calibration tries again with the downtime.
REFIT_CANDIDATES = 6


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
    if result.outcome is Outcome.COMPLETED:
        outcome = "completed"
    elif result.outcome is Outcome.ABORTED:
        why = result.abort_reason.value if result.abort_reason is not None else result.reason
        outcome = f"aborted: {why}"
    else:
        outcome = f"failed: {result.reason}"
    return Prediction(
        droplet_id=droplet_id,
        converges=result.outcome is Outcome.COMPLETED,
        duration_s=result.duration_s,
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
class RecordedRun:
    """A real migration as the engine recorded it: its numbers and every progress sample (plain dicts with
    ``Progress``'s field names, ``phase`` as its value and ``t`` in seconds since the start)."""

    droplet_id: str
    memory_bytes: int
    disk_bytes: int
    cap_mibps: int
    converged: bool
    duration_s: float
    downtime_ms: float | None
    bytes_transferred: int
    samples: tuple[Mapping[str, Any], ...]


@dataclass(frozen=True)
class Calibration:
    link_bps: float
    host: HostModel
    workloads: dict[str, Workload]

    def link(self) -> Link:
        return Link(self.link_bps, self.host, self.host)

    def to_dict(self) -> dict[str, Any]:
        return {
            "link_bps": round(self.link_bps),
            "setup_s": round(self.host.setup_s, 3),
            "switchover_ms": round(self.host.switchover_ms, 1),
            "workloads": {k: w.to_dict() for k, w in sorted(self.workloads.items())},
        }


def _values(samples: Iterable[Mapping[str, Any]], key: str) -> list[float]:
    return [float(s[key]) for s in samples if s.get(key) is not None]


def _sample_rates(r: RecordedRun) -> list[float]:
    out = []
    for a, b in zip(r.samples, r.samples[1:], strict=False):
        dt = float(b.get("t", 0)) - float(a.get("t", 0))
        moved = sum(float(b.get(k, 0) or 0) - float(a.get(k, 0) or 0) for k in _PROCESSED)
        if dt > 0.05 and moved > 0:
            out.append(moved / dt)
    return out


_PROCESSED = ("disk_processed_bytes", "memory_processed_bytes")


def _final(r: RecordedRun, key: str) -> float:
    return float(r.samples[-1].get(key, 0) or 0) if r.samples else 0.0


def _rounds(r: RecordedRun) -> int:
    return max((int(s.get("round", 0) or 0) for s in r.samples), default=0)


def _candidates(name: str, runs: Sequence[RecordedRun]) -> list[Workload]:
    """Workloads consistent with a droplet's samples, one per hot-set size tried.

    What the samples pin down: the allocated disk (the mirror's bytes of the run that rewrote least), the
    disk write rate (libvirt's dirty rate of the mirror), the hot memory (what was left after round 1, when
    seen). What they leave open (QEMU reports no dirty rate for a guest paced below its sync period) is
    tried: hot sets from 256 KiB to the RAM, each swept every step (the harness's guests rewrite theirs
    18x/s), with the resident memory that the run's bytes then imply.
    """
    samples = [s for r in runs for s in r.samples]
    disk_rates = [v for v in _values(samples, "disk_dirty_rate_bps") if v > 0]
    disk_rate = statistics.median(disk_rates) if disk_rates else 0.0
    allocated = int(min(_final(r, "disk_processed_bytes") for r in runs))
    memory = max(r.memory_bytes for r in runs)
    disk = max(r.disk_bytes for r in runs)
    later = [s for s in samples if int(s.get("round", 0) or 0) >= 2]
    seen_hot = max(_values(later, "memory_remaining_bytes"), default=0.0)
    hots = {int(seen_hot)} if seen_hot > 0 else set()
    h = 256 * 1024
    while h <= memory:
        hots.add(h)
        h = int(h * 1.41)
    out = []
    for hot in sorted(x for x in hots if x > 0):
        resident = max(
            hot, min(int(_final(r, "memory_processed_bytes")) - hot * max(0, _rounds(r) - 2) for r in runs)
        )
        out.append(
            Workload(
                name,
                disk_rate_bps=disk_rate,
                disk_hot_bytes=min(disk, max(64 * 1024, int(disk_rate * 4.0))),
                memory_rate_bps=2.0 * hot / DEFAULT_STEP_S,
                memory_hot_bytes=hot,
                memory_pattern=Pattern.SEQUENTIAL,
                memory_resident_bytes=min(memory, resident),
                disk_allocated_bytes=allocated,
            )
        )
    return out


def _loss(
    runs: Sequence[RecordedRun], workload: Workload, link: Link, tick_s: float, *, downtime: bool = False
) -> float:
    """How far the sim with ``workload`` lands from ``runs``: a wrong outcome costs 10, bytes and total time
    their log ratio, and with ``downtime`` (once the switchover cost is known) the downtime error in units of
    ``DOWNTIME_LOSS_SCALE_MS``. The downtime is what pins the hot set of a guest QEMU switches over by
    itself: the pause moves what the guest rewrites between two dirty syncs."""
    total = 0.0
    for r in runs:
        p = predict_migration(
            r.droplet_id,
            memory_bytes=r.memory_bytes,
            disk_bytes=r.disk_bytes,
            workload=workload,
            link=link,
            cap_mibps=r.cap_mibps,
            tick_s=tick_s,
            timeout_s=max(20.0, r.duration_s * 2),
            assess_risk=False,
        )
        if p.converges != r.converged:
            total += 10.0
        total += abs(math.log(max(p.bytes_transferred, 1) / max(r.bytes_transferred, 1)))
        total += abs(math.log(max(p.duration_s, 0.05) / max(r.duration_s, 0.05)))
        if downtime and p.downtime_ms is not None and r.downtime_ms is not None:
            total += abs(p.downtime_ms - r.downtime_ms) / DOWNTIME_LOSS_SCALE_MS
    return total


def fit_workload(
    name: str,
    runs: Sequence[RecordedRun],
    link: Link | None = None,
    *,
    tick_s: float = DEFAULT_TICK_S,
    downtime: bool = False,
    candidates: Sequence[Workload] | None = None,
) -> Workload:
    """A droplet's workload: of the candidates its samples allow (or ``candidates``), the one whose
    simulation of its own runs comes closest (outcome, bytes, total time, and with ``downtime`` the downtime
    too)."""
    return _ranked(name, runs, link or Link(), tick_s, downtime, candidates)[0]


def _ranked(
    name: str,
    runs: Sequence[RecordedRun],
    link: Link,
    tick_s: float,
    downtime: bool,
    candidates: Sequence[Workload] | None = None,
) -> list[Workload]:
    """The candidate workloads, best first."""
    pool = list(candidates) if candidates is not None else _candidates(name, runs)
    losses = [_loss(runs, w, link, tick_s, downtime=downtime) for w in pool]
    return [w for _, _, w in sorted(zip(losses, range(len(pool)), pool, strict=True))]


def fixed_costs(
    runs: Sequence[RecordedRun],
    workloads: Mapping[str, Workload],
    link_bps: float,
    *,
    tick_s: float = DEFAULT_TICK_S,
) -> HostModel:
    """The fixed costs: the median of what each converged run took beyond what the sim with no fixed cost
    predicts for it (total time: ``setup_s``; downtime: ``switchover_ms``). Medians, because the real runs
    scatter around them (on the loaded two-core harness: ±0.5 s and ±60 ms for the same guest)."""
    bare = Link(
        link_bps, HostModel(setup_s=0.0, switchover_ms=0.0), HostModel(setup_s=0.0, switchover_ms=0.0)
    )
    extra_s: list[float] = []
    extra_ms: list[float] = []
    for r in runs:
        if not r.converged:
            continue
        p = predict_migration(
            r.droplet_id,
            memory_bytes=r.memory_bytes,
            disk_bytes=r.disk_bytes,
            workload=workloads[r.droplet_id],
            link=bare,
            cap_mibps=r.cap_mibps,
            tick_s=tick_s,
            timeout_s=max(60.0, r.duration_s * 3),
            assess_risk=False,
        )
        if p.converges:
            extra_s.append(r.duration_s - p.duration_s)
            if r.downtime_ms is not None and p.downtime_ms is not None:
                extra_ms.append(r.downtime_ms - p.downtime_ms)
    setup_s = min(3600.0, max(0.0, statistics.median(extra_s))) if extra_s else HostModel().setup_s
    switchover_ms = (
        min(60_000.0, max(0.0, statistics.median(extra_ms))) if extra_ms else HostModel().switchover_ms
    )
    return HostModel(setup_s=setup_s, switchover_ms=switchover_ms)


def calibrate(runs: Sequence[RecordedRun], *, tick_s: float = DEFAULT_TICK_S) -> Calibration:
    """Fit the sim to real runs, in four steps:

    1. the link: the fastest the uncapped runs' bytes grew between two samples (libvirt's own rate is an
       average that includes the setup, when nothing moves);
    2. per droplet, the workload whose simulation of its runs matches their outcome, bytes and total time;
    3. the fixed costs (``fixed_costs``) with those workloads;
    4. per droplet again, now with the costs known, matching the downtime too (it tells how much QEMU moved
       in the pause, i.e. the hot set), and the fixed costs once more with the final workloads.
    """
    if not runs:
        raise ValueError("no recorded migrations to calibrate from")
    by_droplet: dict[str, list[RecordedRun]] = {}
    for r in runs:
        by_droplet.setdefault(r.droplet_id, []).append(r)
    uncapped = [r for r in runs if not r.cap_mibps] or list(runs)
    rates = [rate for r in uncapped for rate in _sample_rates(r)]
    link_bps = max(rates) if rates else DEFAULT_NIC_BPS
    if not math.isfinite(link_bps) or link_bps <= 0:
        link_bps = DEFAULT_NIC_BPS
    first = Link(link_bps, HostModel(), HostModel())
    ranked = {d: _ranked(d, rs, first, tick_s, False) for d, rs in by_droplet.items()}
    workloads = {d: r[0] for d, r in ranked.items()}
    host = fixed_costs(runs, workloads, link_bps, tick_s=tick_s)
    fitted = Link(link_bps, host, host)
    # Step 4 tries only the best few of step 2: the downtime decides between workloads that already fit the
    # bytes and time, and trying every candidate again doubled the calibration's cost.
    workloads = {
        d: fit_workload(
            d, by_droplet[d], fitted, tick_s=tick_s, downtime=True, candidates=r[:REFIT_CANDIDATES]
        )
        for d, r in ranked.items()
    }
    host = fixed_costs(runs, workloads, link_bps, tick_s=tick_s)
    return Calibration(link_bps, host, workloads)


# ---- an evacuation's forecast ------------------------------------------------------------------------------


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
