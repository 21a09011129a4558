"""``bench/fleet.py --small`` still runs end to end (so the fleet benchmark does not rot): a small fleet on a
real PostgreSQL, two real metadata servers, one ``host-engine run`` worker for a bounded time; its results
say every limit held, counted from the store's log, and that migrations completed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests import pg
from tests.support import require

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def test_bench_fleet_small_runs_and_keeps_the_limits(tmp_path: Path) -> None:
    reason = pg.missing_reason()
    require(reason is None, reason or "")
    out = tmp_path / "fleet.json"
    proc = subprocess.run(
        [
            sys.executable,
            "bench/fleet.py",
            "--small",
            "--order",
            "1",
            "--max-minutes",
            "0.4",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    (run,) = results["runs"]
    assert run["workers"] == 1
    assert run["completed"] > 0, run
    assert run["within_limits"] is True, run
    assert run["max_seen"]["fleet"] <= run["limits"]["max_parallel"]
    assert run["admin_requests_per_migration"] > 0, run
    assert run["tick_s"]["count"] > 0, run
    assert results["plan_evacuate"]["placed"] == results["plan_evacuate"]["droplets"]
