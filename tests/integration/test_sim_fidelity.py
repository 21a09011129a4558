"""The simulator against recorded real libvirt migrations (bench/results/sim_fidelity_runs.json).

Calibrated on the first repetition, it predicts the second: what holds in docs/benchmarks.md (every outcome
right, bytes within 20 %) must keep holding; the rows that miss total time or downtime are reported there.
Re-record with ``sudo .venv/bin/python bench/sim_fidelity.py --record`` (root, libvirt).
"""

from __future__ import annotations

import json
from pathlib import Path

from bench import sim_fidelity

ROOT = Path(__file__).resolve().parents[2]


def test_sim_predicts_every_outcome_and_the_bytes_of_real_runs_it_was_not_calibrated_on(
    tmp_path: Path,
) -> None:
    out = tmp_path / "fidelity.json"
    assert sim_fidelity.compare(ROOT / "bench" / "results" / "sim_fidelity_runs.json", out) == 0
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert len(rows) == 8  # four guest kinds, uncapped and capped
    assert {(r["workload"], bool(r["cap_mibps"])) for r in rows} == {
        (w, capped)
        for w in ("memory 8 MiB", "memory 48 MiB", "memory + disk", "disk heavy")
        for capped in (0, 1)
    }
    assert all(r["within"]["outcome"] for r in rows), [
        r["workload"] for r in rows if not r["within"]["outcome"]
    ]
    assert all(r["within"]["bytes"] for r in rows), [(r["workload"], r["bytes_err_pct"]) for r in rows]
    # Calibrated only from repetition 1; every predicted row is another repetition.
    assert doc["calibrated_on"] == "rep 1" and all(r["rep"] != 1 for r in rows)
