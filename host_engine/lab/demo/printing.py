"""What the demo prints while it runs: the inventory, the plan with its reasons, the simulator's forecast,
one host-by-host verdict, then the news of each engine tick (state changes, progress, hook lines)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from host_engine import planner, prediction
from host_engine.config import EngineConfig
from host_engine.drivers.sim import GiB
from host_engine.lab.demo.agents import ScenarioAgent
from host_engine.lab.demo.scenario import EVACUATE, DemoOptions, executor_config, sim_settings
from host_engine.models import LogEntry, Migration
from host_engine.placement import Plan
from host_engine.prediction import Prediction
from host_engine.states import LogKind, MigrationState
from host_engine.store import Store

Echo = Callable[[str], None]

# Progress lines: one per phase or controller change, else at most this often per migration.
PROGRESS_EVERY_S = 1.5


def print_inventory(echo: Echo, store: Store, options: DemoOptions) -> None:
    for h in store.list_hosts():
        here = store.list_droplets(host=h.name)
        names = ", ".join(f"{d.id} ({options.spec(d.id).kind})" for d in here) or "-"
        echo(f"    {h.name}: {h.vcpus} vCPUs, {h.memory_bytes // GiB} GiB: {names}")


def print_plan(echo: Echo, schedule: planner.Schedule, now: datetime) -> None:
    echo("")
    echo("  PLAN  (placement: filters, then weighers; the planner spaces the windows)")
    echo(f"    {'DROPLET':9} {'TARGET':7} {'SCORE':>6}  {'NOTICE':>7} {'WINDOW':>7}  WHY")
    for mv in schedule.moves:
        c = mv.choice
        notice_in = (mv.notice_at - now).total_seconds()
        window_in = (mv.not_before - now).total_seconds()
        runners = ", ".join(f"{h} {s:.3f}" for h, s in c.runners_up) or "none"
        echo(
            f"    {mv.droplet.id:9} {mv.target:7} {c.score or 0:6.3f}  "
            f"+{notice_in:5.1f}s +{window_in:5.1f}s  "
            f"runners-up {runners}; rejected: {c.summary_of_rejections()}"
        )
    echo("")


def print_forecast(
    echo: Echo,
    schedule: planner.Schedule,
    config: EngineConfig,
    options: DemoOptions,
    written: Sequence[Migration] = (),
) -> dict[str, Prediction]:
    """What the simulator predicts for each move, run as the demo's executor runs them: each droplet's own
    workload, the hosts' NICs shared, the executor's limits (the demo's one worker, at most 3 out of hv-1,
    2 into a host) and controller tick, the moves in the order its claims take them (``written``: by window,
    then migration id; else the plan's); the predictions by droplet."""
    claim_order = {m.droplet_id: (m.not_before, m.id) for m in written}
    ordered = sorted(schedule.moves, key=lambda mv: claim_order.get(mv.droplet.id, (mv.not_before, "")))
    moves = [
        (mv.droplet.id, EVACUATE, mv.target, mv.droplet.memory_bytes, mv.droplet.disk_bytes) for mv in ordered
    ]
    fc = prediction.forecast_shared(
        moves,
        sim_settings(options),
        config=config.controller,
        limits=prediction.Limits.of(config, workers=1),
        tick_s=executor_config(config).tick_s,
        seed=options.seed,  # the demo's simulated hosts' world
    )
    echo("  PREDICTED  (the simulator, before anything moves: the executor's limits, the NICs shared)")
    echo(f"    {'DROPLET':9} {'DURATION':>9} {'DOWNTIME':>9} {'MOVED':>9}  THROTTLE, RISK")
    predictions = {}
    for did, _src, _dst, p in fc.predictions:
        predictions[did] = p
        down = "-" if p.downtime_ms is None else f"{p.downtime_ms:.0f} ms"
        throttle = f"{p.throttle_pct_s:,.0f} %·s" if p.throttle_pct_s else "none"
        echo(
            f"    {did:9} {p.duration_s:8.1f}s {down:>9} {p.bytes_transferred / GiB:7.1f}G  "
            f"{throttle}, risk {p.risk.value}"
        )
    echo(f"    window: {fc.window_s:.0f} s of migration time under the limits")
    echo("")
    return predictions


def print_explain(echo: Echo, preview: Plan) -> None:
    """Every host's verdict for the droplet with the most rejections: why it goes where it goes."""
    if not preview.choices:
        return
    choice = max(preview.choices, key=lambda c: sum(c.rejected.values()))
    echo(f"  WHY {choice.droplet_id} goes to {choice.target}: every host's verdict")
    for v in choice.verdicts or ():
        if v.accepted:
            detail = ", ".join(f"{k} {val:.3f}" for k, val in v.components.items())
            echo(f"    {v.host:6} #{v.rank} score {v.score or 0:.3f} ({detail})")
        else:
            echo(f"    {v.host:6} rejected by {v.filter}: {v.reason}")
    echo("")


@dataclass
class News:
    """Prints what is new since the last call: each migration's log (state changes; progress when its phase
    or the controller's action changed, else now and then) and each agent's hook lines."""

    say: Echo
    store: Store
    _log_ids: set[int] = field(default_factory=set)
    _hook_lines: dict[str, int] = field(default_factory=dict)
    _progress_at: dict[str, float] = field(default_factory=dict)
    _progress_key: dict[str, tuple[object, ...]] = field(default_factory=dict)

    def print(self, migrations: Mapping[str, str], agents: Mapping[str, ScenarioAgent]) -> None:
        for mid in migrations.values():
            self.print_log(mid)
        for did, agent in agents.items():
            runs = agent.hook_runs()
            for r in runs[self._hook_lines.get(did, 0) :]:
                self.say(f"  {did:8} | {r.phase.value}/{r.hook}: {r.says}")
            self._hook_lines[did] = len(runs)

    def print_log(self, migration_id: str) -> None:
        for e in self.store.migration_log(migration_id):
            if e.id in self._log_ids:
                continue
            self._log_ids.add(e.id)
            line = self._log_line(e)
            if line is not None:
                self.say(f"{e.droplet_id:8} {line}")

    def _log_line(self, e: LogEntry) -> str | None:
        if e.kind == LogKind.TRANSITION and e.to_state is not None:
            if e.to_state is MigrationState.PLANNED:
                return None  # the plan table said it
            return f"{e.to_state.value:>16}: {e.message}"
        if e.kind == LogKind.PROGRESS:
            key = (e.data.get("phase"), e.data.get("memory_throttle_pct"), e.data.get("disk_write_limit_bps"))
            now = time.monotonic()
            last_key = self._progress_key.get(e.migration_id)
            last_at = self._progress_at.get(e.migration_id, 0.0)
            if key == last_key and now - last_at < PROGRESS_EVERY_S:
                return None
            self._progress_key[e.migration_id] = key
            self._progress_at[e.migration_id] = now
            return f"{'':>16}  {e.message}"
        if e.kind in (LogKind.WAIT, LogKind.ALERT):
            return f"{e.kind:>16}: {e.message}"
        return None
