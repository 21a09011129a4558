"""The simulator against recorded real libvirt migrations (bench/results/sim_fidelity_runs.json).

Calibrated on the other repetitions, it predicts the last one (the bench leaves each repetition out in
turn; one fold here keeps the test short): every outcome must be right, and every target must hold on every
run but the 48 MiB writer's uncapped one. Which rows miss, and by how much, is in docs/benchmarks.md.
Re-record with ``sudo .venv/bin/python bench/sim_fidelity.py --record`` (root, libvirt).
"""

from __future__ import annotations

import json
from pathlib import Path

from bench import sim_fidelity

ROOT = Path(__file__).resolve().parents[2]
RUNS = ROOT / "bench" / "results" / "sim_fidelity_runs.json"


def test_sim_predicts_every_outcome_of_real_runs_it_was_not_calibrated_on(tmp_path: Path) -> None:
    reps = sorted({r["rep"] for r in json.loads(RUNS.read_text())["runs"]})
    assert len(reps) >= 2
    out = tmp_path / "fidelity.json"
    assert sim_fidelity.compare(RUNS, out, holdout=[reps[-1]]) == 0
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert {(r["workload"], bool(r["cap_mibps"])) for r in rows} == {
        (w, capped)
        for w in ("memory 8 MiB", "memory 48 MiB", "memory + disk", "disk heavy")
        for capped in (False, True)
    }
    # Predicted only runs of the held-out repetition, from a calibration without them.
    assert all(r["rep"] == reps[-1] for r in rows)
    assert set(doc["calibrations"]) == {f"without rep {reps[-1]}"}
    assert all(r["within"]["outcome"] for r in rows), [
        r["workload"] for r in rows if not r["within"]["outcome"]
    ]
    # What docs/benchmarks.md reports: every target on every row but the 48 MiB writer's uncapped ones, whose
    # real runs split between two outcomes no single prediction can both be near (113 vs 258-261 MiB).
    settled = [r for r in rows if not (r["workload"] == "memory 48 MiB" and not r["cap_mibps"])]
    assert all(r["hit"] for r in settled), [
        (r["workload"], r["cap_mibps"], r["total_err_pct"], r["downtime_err_ms"], r["bytes_err_pct"])
        for r in settled
        if not r["hit"]
    ]
