"""Per-move predictions of an evacuation come from the run the executor will do (issue 14).

``plan evacuate --predict`` prints, and ``evacuate --predict`` stores (and sends each guest), each move's
duration, downtime, bytes, throttle and risk. They used to simulate each move alone on its link while only
the window shared the source's NIC: with three copies leaving one host at once, every duration was about a
third of what the executor then took. Here the stored predictions meet the demo's executor (its helpers in
``test_demo_forecast``), and the CLI's JSON shows the shared numbers.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from host_engine.config import EngineConfig
from host_engine.drivers.sim import MiB, idle
from host_engine.drivers.sim.settings import sim_settings
from host_engine.evacuation_forecast import PlannedMove, forecast_evacuation, store_predictions
from host_engine.expectation import predicted
from host_engine.lab.demo.scenario import SIM_TICK_S
from host_engine.prediction import Basis, Link, predict_migration
from tests.unit.host_engine.conftest import FakeClock
from tests.unit.host_engine.test_cli import ok
from tests.unit.host_engine.test_demo_forecast import (
    DOWNTIME_TOLERANCE_MS,
    DROPLETS,
    DURATION_TOLERANCE,
    JITTER_S,
    Evacuation,
)

GiB = 1024 * MiB
LINK_MIBPS = 100
MEMORY, DISK = 1 * GiB, 8 * GiB


@pytest.mark.slow
def test_evacuate_predict_stores_the_durations_the_executor_then_takes_three_at_once(tmp_path: Path) -> None:
    # hv-1's four guests, three at once out of its NIC (max_per_source 3), the fourth in the first free slot.
    evacuation = Evacuation.plan(tmp_path, DROPLETS)
    assert evacuation.config.schedule.max_per_source == 3
    # `host-engine run` ticks the controller once per [engine] poll_interval (the demo's executor: 0.5 s).
    config = replace(evacuation.config, engine=replace(evacuation.config.engine, poll_interval_s=SIM_TICK_S))
    stored = store_predictions(evacuation.store, config, evacuation.written, seed=evacuation.options.seed)
    expected = {m.droplet_id: predicted(m.stats) for m in stored}
    actual = evacuation.run(JITTER_S)
    report = [
        (d, p.duration_s, actual[d]["duration_s"], p.downtime_ms, actual[d]["downtime_ms"])
        for d, p in expected.items()
        if p is not None
    ]
    assert len(report) == len(DROPLETS)
    for droplet_id, p_s, a_s, p_ms, a_ms in report:
        assert abs(p_s - a_s) <= DURATION_TOLERANCE * a_s, (droplet_id, report)
        assert p_ms is not None and abs(p_ms - a_ms) <= DOWNTIME_TOLERANCE_MS, (droplet_id, report)
    evacuation.store.close()


def _settings_config(**concurrency: int) -> EngineConfig:
    settings = sim_settings({"link_mibps": LINK_MIBPS, "default_workload": "idle"})
    config = EngineConfig(sim=settings)
    return replace(config, schedule=replace(config.schedule, **concurrency))


def _alone_s() -> float:
    return predict_migration(
        "x",
        memory_bytes=MEMORY,
        disk_bytes=DISK,
        workload=idle(),
        link=Link(LINK_MIBPS * MiB),
        assess_risk=False,
    ).duration_s


def test_a_move_whose_window_opens_after_the_others_ended_is_predicted_as_it_runs_alone() -> None:
    config = _settings_config(max_parallel=4, max_per_source=2, max_per_target=2)
    together = [PlannedMove("a", "src", "t1", MEMORY, DISK), PlannedMove("b", "src", "t2", MEMORY, DISK)]
    spaced = [together[0], replace(together[1], opens_s=2000.0)]
    alone_s = _alone_s()
    both = {d: p for d, _s, _t, p in forecast_evacuation(together, config).predictions}
    fc = forecast_evacuation(spaced, config)
    apart = {d: p for d, _s, _t, p in fc.predictions}
    # Sharing the source's NIC, each copy takes about twice as long; a window opening later does not share it.
    assert both["b"].duration_s > 1.8 * alone_s and both["b"].basis is Basis.SHARED
    assert apart["b"].duration_s == pytest.approx(alone_s, rel=0.02) and apart["b"].basis is Basis.SHARED
    assert {s.droplet_id: s.start_s for s in fc.schedule}["b"] == pytest.approx(2000.0, abs=1.5)
    assert fc.window_s == pytest.approx(2000.0 + alone_s, abs=2.0)


def test_a_move_beyond_the_shared_bound_is_predicted_alone_and_says_so() -> None:
    config = _settings_config(max_parallel=4, max_per_source=2, max_per_target=2)
    moves = [PlannedMove("a", "src", "t1", MEMORY, DISK), PlannedMove("b", "src", "t2", MEMORY, DISK)]
    fc = forecast_evacuation(moves, config, max_shared_moves=1)
    rows = {d["droplet_id"]: d for d in fc.to_dict()["droplets"]}
    assert rows["a"]["basis"] == "shared" and rows["a"]["note"] is None
    assert rows["b"]["basis"] == "alone" and "beyond the 1 moves" in rows["b"]["note"]
    assert rows["b"]["duration_s"] == pytest.approx(_alone_s(), abs=0.1)
    # The alone move is laid after the shared run in the window, not silently overlapping it.
    assert fc.window_s >= rows["a"]["duration_s"] + rows["b"]["duration_s"] - 1.0


def test_cli_plan_evacuate_predict_json_shows_the_moves_sharing_the_sources_link(
    tmp_path: Path, clock: FakeClock
) -> None:
    db = str(tmp_path / "e.db")
    for i in (1, 2, 3, 4):
        ok(db, clock, "host", "add", f"hv{i}", "--datacenter", "nyc1", "--vcpus", "16", "--memory", "64GiB",
           "--disk", "1TiB", "--compat-group", "g1")  # fmt: skip
    for n in (1, 2, 3):
        ok(db, clock, "droplet", "add", f"d{n}", "--host", "hv1", "--vcpus", "1", "--memory", "1GiB", "--disk",
           "8GiB", "--address", f"10.0.0.{n}")  # fmt: skip
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        "[concurrency]\nmax_parallel = 3\nmax_per_source = 3\nmax_per_target = 2\n"
        f'[sim]\nlink_mibps = {LINK_MIBPS}\ndefault_workload = "idle"\n'
    )
    doc = json.loads(
        ok(db, clock, "--config", str(cfg), "plan", "evacuate", "hv1", "--predict", "--json").output
    )["forecast"]
    alone_s = _alone_s()
    rows = doc["droplets"]
    assert sorted(r["droplet_id"] for r in rows) == ["d1", "d2", "d3"]
    for r in rows:
        # Three copies out of hv1's 100 MiB/s at once: each about three times what it takes alone (it was
        # predicted alone, a third of this, while only the window shared the link).
        assert 2.7 * alone_s < r["duration_s"] < 3.3 * alone_s, (r, alone_s)
        assert r["basis"] == "shared" and r["note"] is None, r
        assert r["starts_after_s"] == 0.0 and r["converges"] is True, r
    assert doc["window_s"] == pytest.approx(max(r["duration_s"] for r in rows), abs=1.0)
    assert doc["limits"] == {"max_parallel": 3, "max_per_source": 3, "max_per_target": 2}
    text = ok(db, clock, "--config", str(cfg), "plan", "evacuate", "hv1", "--predict").output
    assert "sharing each host's link" in text and "window:" in text
