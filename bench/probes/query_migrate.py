"""Probe: what QEMU itself reports during a migration, read every 50 ms, beside what the engine did.

A one-off experiment on the two-host libvirt harness, not a benchmark the engine's figures come from. One of
``bench/libvirt_migration.py``'s guests is migrated by the engine (``bench/sim_fidelity.py``'s
``record_one``: the shipped driver and controller) while a thread reads QMP ``query-migrate`` on the source
every 50 ms; every downtime limit and throttle the controller sets is logged with its time.

    sudo flock /work/coord/harness.lock .venv/bin/python bench/probes/query_migrate.py \\
        --workload "memory 8 MiB" --cap 32 --reps 2 --json bench/results/probes/query_migrate_8mib_32.json

What it showed (2026-12-05, the 8 MiB writer at a 32 MiB/s cap, used by the simulator's ``reported_pages``):
QEMU's ``ram.remaining`` is its dirty bitmap, which it reads as 4.6 MiB a window after each sync and 1.0 MiB
before the next while each pause must carry the whole 8 MiB hot set; so the controller raised the limit to
200 ms (which 4.6 MiB fits and 8 MiB does not), QEMU went on for three more rounds, and took it only at
300 ms. The guest, rewriting 8 MiB 18 times a second when not migrating, dirtied 34 MiB/s under QEMU's dirty
tracking (TCG).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import libvirt_migration as lm
from bench import sim_fidelity as sf
from bench.libvirt_bench_harness import bench_harness, missing_prerequisites

POLL_S = 0.05
MAX_READINGS = 2000  # 100 s of readings at most per run


def _instrument(events: list[dict[str, Any]], t0: list[float]) -> None:
    """Log the controller's downtime limits and throttles, and read QEMU's view while the job runs."""
    from host_engine.drivers.libvirt import migration as m
    from host_engine.drivers.libvirt.qmp import qmp

    def at() -> float:
        return round(time.monotonic() - t0[0], 3)

    set_downtime = m.LibvirtMigration.set_max_downtime
    set_throttle = m.LibvirtMigration.set_memory_throttle
    start = m.LibvirtMigration.start

    def logged_downtime(self: Any, ms: int) -> None:
        events.append({"t": at(), "set_max_downtime_ms": ms})
        set_downtime(self, ms)

    def logged_throttle(self: Any, percent: int) -> None:
        events.append({"t": at(), "set_memory_throttle_pct": percent})
        set_throttle(self, percent)

    def watched_start(self: Any) -> None:
        start(self)
        dom = self._dom

        def poll() -> None:
            for _ in range(MAX_READINGS):
                try:
                    q = qmp(dom, "query-migrate", {})
                except Exception as e:  # the source domain is gone once the job ends
                    events.append({"t": at(), "query_error": str(e)[:80]})
                    return
                ram = q.get("ram", {})
                events.append(
                    {
                        "t": at(),
                        "status": q.get("status"),
                        "dirty_sync_count": ram.get("dirty-sync-count"),
                        "remaining_kib": ram.get("remaining", 0) >> 10,
                        "transferred_kib": ram.get("transferred", 0) >> 10,
                        "mbps": ram.get("mbps"),
                        "dirty_pages_rate": ram.get("dirty-pages-rate"),
                        "expected_downtime_ms": q.get("expected-downtime"),
                    }
                )
                if q.get("status") in ("completed", "failed", "cancelled"):
                    return
                time.sleep(POLL_S)

        threading.Thread(target=poll, daemon=True).start()

    m.LibvirtMigration.set_max_downtime = logged_downtime  # type: ignore[method-assign]
    m.LibvirtMigration.set_memory_throttle = logged_throttle  # type: ignore[method-assign]
    m.LibvirtMigration.start = watched_start  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    names = [w.name for w in lm.ALL_WORKLOADS]
    parser.add_argument("--workload", choices=names, default="memory 8 MiB")
    parser.add_argument("--cap", type=int, default=32, help="bandwidth cap in MiB/s (0: none)")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=20.0)
    parser.add_argument("--json", type=Path, help="where the runs and readings go")
    args = parser.parse_args(argv)
    if not 1 <= args.reps <= 20 or args.cap < 0:
        parser.error("--reps must be 1-20 and --cap 0 or more")
    missing = missing_prerequisites()
    if missing:
        print(f"query_migrate: cannot run (needs {', '.join(missing)})")
        return 1
    workload = next(w for w in lm.ALL_WORKLOADS if w.name == args.workload)
    events: list[dict[str, Any]] = []
    t0 = [0.0]
    _instrument(events, t0)
    runs = []
    with bench_harness("f-warmup") as harness:
        for rep in range(args.reps):
            events.clear()
            t0[0] = time.monotonic()
            r = sf.record_one(harness.hosts, harness.conns, workload, args.cap, args.timeout)
            summary = {k: v for k, v in r.items() if k != "samples"}
            print(json.dumps(summary), flush=True)
            for e in events:
                if "status" not in e or e["status"] == "active" or e["status"] == "completed":
                    print("  ", json.dumps(e))
            runs.append(
                {"rep": rep + 1, "run": summary, "engine_samples": r["samples"], "events": list(events)}
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"machine": lm.machine(), "code": sf._code_state(), "runs": runs}, indent=1) + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
