"""A ``host-engine run --driver sim`` tick stays bounded when simulating is slower than ``--sim-speed``.

Seen in ``bench/fleet.py``: each tick had more simulated time to catch up than the one before (ticks of 8,
22, then 96 s of wall time), so the world moved in ever larger bursts. Now a tick simulates for at most
``MAX_SIM_TICK_S`` of wall time and the world falls behind the speed asked, logged once.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

import pytest

from host_engine.controller import GiB
from host_engine.engine_steps import MAX_SIM_TICK_S, SimTickStep
from host_engine.executor import ExecutorConfig
from host_engine.models import Droplet, Host, NewMigration
from host_engine.states import MigrationState as S
from host_engine.store import Store

SPEED = 20.0
GAP_S = 100.0  # wall seconds since the last tick: 2,000 simulated seconds due
STEP_COST_S = 0.01  # wall time each look at the clock costs here (simulating is slow)


def test_a_sim_tick_that_cannot_keep_up_stops_after_its_bound_and_says_so_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = Store.open(tmp_path / "engine.db")
    for name in ("a", "b"):
        store.add_host(Host(name, "nyc1", 32, 128 * GiB, 20_000 * GiB, hypervisor_uri=f"sim://{name}"))
    store.add_droplet(Droplet("d1", "a", 2, GiB, 10_000 * GiB, addresses=("10.0.0.2",)))
    now = store.clock()
    (m,) = store.create_migrations([NewMigration("d1", "a", "b", now, now, now + timedelta(hours=1))])
    store.transition(m.id, S.NOTIFIED, notified_at=now)
    wall = [0.0]

    def monotonic() -> float:
        wall[0] += STEP_COST_S
        return wall[0]

    step = SimTickStep.open(store, ExecutorConfig(worker="w1", tick_s=1.0), speed=SPEED, monotonic=monotonic)
    step.tick()
    assert store.get_migration(m.id).state is S.RUNNING
    caplog.set_level(logging.WARNING)
    for _ in range(2):
        wall[0] += GAP_S
        started_at, world_at = wall[0], step.world.time_s
        step.tick()
        # Bounded: about MAX_SIM_TICK_S of simulating (plus the tick's own store work), not the whole gap.
        assert wall[0] - started_at < MAX_SIM_TICK_S + 1.0
        assert 0 < step.world.time_s - world_at < GAP_S * SPEED / 2
    assert step.behind_s > GAP_S * SPEED
    behind = [r for r in caplog.records if "slower than --sim-speed" in r.getMessage()]
    assert len(behind) == 1, [r.getMessage() for r in caplog.records]
    assert store.get_migration(m.id).state is S.RUNNING  # still copying: 10 TB
    store.close()
