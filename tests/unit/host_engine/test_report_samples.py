"""``host-engine report`` has a sample for every controller tick of every phase (issue 15.8: "sample densely
enough that phases are not straight lines"), bounded per attempt however long it runs."""

from __future__ import annotations

import json
from itertools import pairwise

from host_engine.samples import MAX_SAMPLES_PER_ATTEMPT, SampleBuffer
from host_engine.store import Store
from tests.unit.host_engine.cli_run import ok
from tests.unit.host_engine.conftest import GIB, FakeClock, make_droplet
from tests.unit.host_engine.fake_admin import FakeAdmin

# ``host-engine migrate --now`` ticks the controller once per engine poll (1 s by default).
TICK_S = 1.0


def test_report_timeline_has_a_sample_every_tick_of_every_phase(
    db: str, clock: FakeClock, admin: FakeAdmin
) -> None:
    store = Store.open(db)
    # A disk copy of ~20 s and a memory copy of a few seconds on the simulated 10 Gbit/s link.
    store.add_droplet(make_droplet("db1", "hv1", memory_bytes=4 * GIB, disk_bytes=24 * GIB))
    store.close()
    ok(db, clock, "migrate", "db1", "--to", "hv2", "--now", "--unsafe-short-notice")
    store = Store.open(db)
    [m] = store.list_migrations()
    store.close()
    doc = json.loads(ok(db, clock, "report", m.id, "--json").output)
    rows = doc["timeline"]
    phases = [r["phase"] for r in rows]
    assert phases[0] == "disk" and phases[-1] == "done" and "memory" in phases, phases
    for phase in ("disk", "memory"):
        times = [r["elapsed_s"] for r in rows if r["phase"] == phase]
        assert times == sorted(times)
        # No straight line across a phase: at most one tick between two samples.
        assert max(b - a for a, b in pairwise(times)) <= TICK_S + 1e-6, (phase, times)
    disk = [r["elapsed_s"] for r in rows if r["phase"] == "disk"]
    assert disk[-1] - disk[0] >= 10 and len(disk) >= (disk[-1] - disk[0]) / TICK_S
    # The last memory sample is at most a tick before the switchover the report marks.
    [mark] = doc["attempts"]
    memory = [r["elapsed_s"] for r in rows if r["phase"] == "memory"]
    assert mark["switchover_s"] is not None and 0 < mark["switchover_s"] - memory[-1] <= TICK_S, mark
    # Every row carries what the plot and the table draw from.
    assert all({"at", "attempt", "disk_remaining_bytes", "memory_remaining_bytes"} <= r.keys() for r in rows)

    text = ok(db, clock, "report", m.id).output
    assert f"{len(rows)} samples in all" in text  # the table lists the changes, and says there is more


def test_samples_stay_bounded_and_even_however_long_the_attempt() -> None:
    buf = SampleBuffer(attempt=1)
    phases = ["disk"] * 20_000 + ["memory"] * 3_000 + ["switchover"] + ["done"]
    for i, phase in enumerate(phases):
        buf.add({"elapsed_s": float(i), "phase": phase, "round": 0})
    rows = buf.to_json()["rows"]
    assert MAX_SAMPLES_PER_ATTEMPT // 2 <= len(rows) <= MAX_SAMPLES_PER_ATTEMPT + 1
    times = [r[0] for r in rows]
    assert times == sorted(times)
    # Each phase's first sample and the attempt's last are kept.
    assert {0.0, 20_000.0, 23_000.0, 23_001.0} <= set(times)
    # Spread evenly: no gap more than twice the typical one (thinning halves density at most once behind).
    gaps = [b - a for a, b in pairwise(times)]
    typical = sorted(gaps)[len(gaps) // 2]
    assert max(gaps) <= 2 * typical, (max(gaps), typical)


def test_a_short_attempt_keeps_every_sample() -> None:
    buf = SampleBuffer(attempt=2)
    for i in range(MAX_SAMPLES_PER_ATTEMPT):
        buf.add({"elapsed_s": i * 0.5, "phase": "disk" if i < 300 else "memory"})
    doc = buf.to_json()
    assert doc["attempt"] == 2 and len(doc["rows"]) == MAX_SAMPLES_PER_ATTEMPT
