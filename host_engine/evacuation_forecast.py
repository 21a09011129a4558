"""What each move of an evacuation will do, as the executor will run it (issue 14).

``plan evacuate --predict`` prints it, ``evacuate --predict`` stores it with each migration (and so tells
each guest its expected downtime and duration): every number comes from ONE simulated run of the whole
evacuation (``prediction.forecast_shared``), each move beside the moves the executor runs with it:

- the executor's limits (``[concurrency]``: at once, out of the source, into each target) and its
  controller tick (``[engine] poll_interval_s``);
- the executor's order and timing: a migration is claimed no earlier than its window (``not_before``) and,
  among those due, by window then id; the windows are the planner's (``planner.lay_out``: spaced by its
  bandwidth estimate, largest droplet first), so a move whose window opens later does not share the NIC
  with moves that ended before it (a guest acknowledging early can still start sooner: not predicted);
- each host's link shared by the copies that overlap on it.

The risk that a move does not converge is the same run again with every droplet writing
``prediction.RISK_RATE_FACTOR`` faster: ``HIGH`` for a move that does not converge, ``MEDIUM`` for one that
needs the throttle or does not converge in the faster run, else ``LOW``.

A move the shared run cannot predict is simulated alone on its link (``Basis.ALONE``) with a ``note`` saying
why, never silently: a plan of more than ``MAX_SHARED_MOVES`` moves (the shared run's cost grows with the
number of copies at once times the window's length; the moves after the bound, in claim order, are
predicted alone, so their durations are short by about the source's ``max_per_source`` when its NIC is the
bottleneck), or a shared run that failed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from host_engine import planner, prediction
from host_engine.config import EngineConfig
from host_engine.drivers.sim.stored import META_KEY as SIM_META_KEY
from host_engine.drivers.sim.workloads import Workload
from host_engine.expectation import Expected, with_prediction
from host_engine.models import Droplet, Migration
from host_engine.placement import Plan
from host_engine.prediction import Forecast, Limits, Prediction, Risk
from host_engine.store import Store, Tx

log = logging.getLogger(__name__)

# The most moves one shared run simulates (with its risk run): the placement bench's 200-droplet host took
# about 95 s on a 2-core machine (as long as predicting each move alone, twice, took before); the moves after
# it, in claim order, are predicted alone, each with a note.
MAX_SHARED_MOVES = 200
# Where the plan's windows are laid out from when no start is given (only the offsets matter).
_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class PlannedMove:
    """One move as the executor will see it: its sizes, and when its window opens (seconds after the
    first window of the evacuation)."""

    droplet_id: str
    source: str
    target: str
    memory_bytes: int
    disk_bytes: int
    opens_s: float = 0.0

    @property
    def move(self) -> tuple[str, str, str, int, int]:
        return (self.droplet_id, self.source, self.target, self.memory_bytes, self.disk_bytes)


def moves_of_plan(
    plan: Plan, droplets: Sequence[Droplet], source: str, config: EngineConfig
) -> list[PlannedMove]:
    """The placed moves of ``plan`` (``plan evacuate``'s preview) with the windows ``evacuate`` would give
    them with no flags (``[concurrency]``'s limits and the planner's bandwidth estimate; migrations already
    planned elsewhere in the fleet are not counted), in the order the executor would claim them."""
    by_id = {d.id: d for d in droplets}
    placed = [c for c in plan.choices if c.target is not None and c.droplet_id in by_id]
    sched = config.schedule
    limits = planner.Limits(sched.max_parallel, sched.max_per_target, sched.max_per_source)
    times = planner.lay_out(
        [(by_id[c.droplet_id], source, c.target or "") for c in placed], _EPOCH, limits, sched
    )
    out = [
        PlannedMove(
            c.droplet_id,
            source,
            c.target or "",
            by_id[c.droplet_id].memory_bytes,
            by_id[c.droplet_id].disk_bytes,
            (nb - _EPOCH).total_seconds(),
        )
        for c, (nb, _dur) in zip(placed, times, strict=True)
    ]
    # Written in plan order, so their ids are too: the executor takes the due ones by window, then id.
    return sorted(out, key=lambda m: m.opens_s)


def moves_of_migrations(
    migrations: Sequence[Migration], droplets: Mapping[str, Droplet], now: datetime
) -> list[PlannedMove]:
    """``migrations`` (just written by ``evacuate``) as the executor will claim them: by window, then id, a
    window already open at ``now`` counting as open at once."""
    ordered = sorted(migrations, key=lambda m: (m.not_before, m.id))
    if not ordered:
        return []
    first = max(ordered[0].not_before, now)
    return [
        PlannedMove(
            m.droplet_id,
            m.source_host,
            m.target_host,
            droplets[m.droplet_id].memory_bytes,
            droplets[m.droplet_id].disk_bytes,
            max(0.0, (max(m.not_before, now) - first).total_seconds()),
        )
        for m in ordered
    ]


class _Faster:
    """``[sim]`` settings with every droplet writing ``factor`` times faster (the risk run)."""

    def __init__(self, settings: Any, factor: float) -> None:
        self._settings = settings
        self._factor = factor

    def host(self, name: str) -> Any:
        return self._settings.host(name)

    def workload(self, droplet_id: str) -> Workload:
        w: Workload = self._settings.workload(droplet_id)
        return replace(
            w, memory_rate_bps=w.memory_rate_bps * self._factor, disk_rate_bps=w.disk_rate_bps * self._factor
        )


def forecast_evacuation(
    moves: Sequence[PlannedMove],
    config: EngineConfig,
    *,
    cap_mibps: int = 0,
    limits: Limits | None = None,
    tick_s: float | None = None,
    seed: int = 0,
    max_shared_moves: int = MAX_SHARED_MOVES,
) -> Forecast:
    """Every move of ``moves`` (in claim order) predicted from one shared run (see the module docstring);
    ``limits`` default to ``[concurrency]``'s, ``tick_s`` to ``[engine] poll_interval_s``; ``seed``: the
    simulated world's (a forecast of simulated hosts uses theirs)."""
    limits = limits or Limits.of(config)
    tick_s = config.engine.poll_interval_s if tick_s is None else tick_s
    shared_moves, beyond = list(moves[:max_shared_moves]), list(moves[max_shared_moves:])
    common: dict[str, Any] = {
        "config": config.controller,
        "cap_mibps": cap_mibps,
        "limits": limits,
        "tick_s": tick_s,
        "seed": seed,
    }
    opens = {m.droplet_id: m.opens_s for m in shared_moves}
    notes: dict[str, str] = {}
    try:
        base = prediction.forecast_shared([m.move for m in shared_moves], config.sim, opens_s=opens, **common)
        faster = prediction.forecast_shared(
            [m.move for m in shared_moves],
            _Faster(config.sim, prediction.RISK_RATE_FACTOR),
            opens_s=opens,
            **common,
        )
    except Exception as e:  # a model error: said in every move's note, each move then predicted alone
        log.warning("evacuation forecast: the shared run failed (%s); predicting each move alone", e)
        base = faster = Forecast((), (), 0.0, limits)
        notes = {m.droplet_id: f"predicted alone: the shared run failed ({e})" for m in shared_moves}
    shared = {d: p for d, _s, _t, p in base.predictions}
    converges_faster = {d: p.converges for d, _s, _t, p in faster.predictions}
    for m in shared_moves:
        if m.droplet_id not in shared and m.droplet_id not in notes:
            notes[m.droplet_id] = "predicted alone: the shared run did not end this move"
    for m in beyond:
        notes[m.droplet_id] = (
            f"predicted alone: beyond the {max_shared_moves} moves one shared run simulates "
            "(its link not shared: the duration is a lower bound)"
        )
    predictions: list[tuple[str, str, str, Prediction]] = []
    for m in moves:
        p = shared.get(m.droplet_id)
        if p is not None:
            p = replace(p, risk=_risk(p, converges_faster.get(m.droplet_id, False)))
        else:
            p = replace(_alone(m, config, cap_mibps, tick_s), note=notes[m.droplet_id])
        predictions.append((m.droplet_id, m.source, m.target, p))
    return _with_window(predictions, base, moves, limits)


def _risk(p: Prediction, converges_faster: bool) -> Risk:
    if not p.converges:
        return Risk.HIGH
    return Risk.MEDIUM if p.throttle_pct_s > 0 or not converges_faster else Risk.LOW


def _alone(m: PlannedMove, config: EngineConfig, cap_mibps: int, tick_s: float) -> Prediction:
    src, dst = config.sim.host(m.source), config.sim.host(m.target)
    return prediction.predict_migration(
        m.droplet_id,
        memory_bytes=m.memory_bytes,
        disk_bytes=m.disk_bytes,
        workload=config.sim.workload(m.droplet_id),
        link=prediction.Link(min(src.link_bps, dst.link_bps), src.model, dst.model),
        cap_mibps=cap_mibps,
        config=config.controller,
        tick_s=tick_s,
    )


def _with_window(
    predictions: list[tuple[str, str, str, Prediction]],
    base: Forecast,
    moves: Sequence[PlannedMove],
    limits: Limits,
) -> Forecast:
    """The shared run's schedule, the moves predicted alone laid after it under the limits (from their
    window or the shared run's end, whichever is later)."""
    schedule = list(base.schedule)
    done = {s.droplet_id for s in schedule}
    rest = [(d, s, t, p.duration_s) for d, s, t, p in predictions if d not in done]
    if rest:
        after = max(base.window_s, min(m.opens_s for m in moves if m.droplet_id not in done))
        _length, laid = prediction.window(rest, limits=limits)
        schedule += [replace(x, start_s=x.start_s + after, end_s=x.end_s + after) for x in laid]
    length = max((x.end_s for x in schedule), default=0.0)
    return Forecast(tuple(predictions), tuple(schedule), length, limits)


def sim_seed(tx: Tx) -> int:
    """The seed of the store's simulated world (``--driver sim`` hosts; 0 when there is none): a forecast of
    simulated hosts places hot sets and random writes as their world does."""
    meta = tx.sim_get(SIM_META_KEY)
    return int(meta["seed"]) if isinstance(meta, dict) and isinstance(meta.get("seed"), int) else 0


def store_predictions(
    store: Store, config: EngineConfig, written: Sequence[Migration], *, cap_mibps: int = 0, seed: int = 0
) -> list[Migration]:
    """Predict ``written`` (one evacuation's migrations) as the executor will run them and keep each
    prediction in its migration's stats (``expectation.with_prediction``: what its guest is told)."""
    with store.begin(readonly=True) as tx:
        droplets = {m.droplet_id: tx.get_droplet(m.droplet_id) for m in written}
        now = tx.now
    moves = moves_of_migrations(written, droplets, now)
    fc = forecast_evacuation(moves, config, cap_mibps=cap_mibps, seed=seed)
    by_droplet = {d: p for d, _s, _t, p in fc.predictions}
    out = []
    with store.begin() as tx:
        for m in written:
            p = by_droplet[m.droplet_id]
            expected = Expected(p.duration_s, p.downtime_ms if p.converges else None, p.bytes_transferred)
            out.append(tx.update_migration(m.id, stats=with_prediction(m.stats, expected)))
    return out
