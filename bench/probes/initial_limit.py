"""Probe: does the controller's first downtime limit (``initial_downtime_ms``) change the downtime?

A one-off experiment on the two-host libvirt harness, not a benchmark the engine's figures come from. The
guests, policies and measurement are ``bench/libvirt_migration.py``'s: each repetition migrates every case
under libvirt's defaults (300 ms from the start) and under the engine's controller with each first limit
asked for (the ramp then raises it as it ships), interleaved, and prints the medians [min-max].

    sudo flock /work/coord/harness.lock .venv/bin/python bench/probes/initial_limit.py --reps 4 \\
        --initials 50,20,10 --json bench/results/probes/initial_limit.json

The idea tested (2026-12-04): the harness's guests rewrite their hot set in bursts, so a smaller limit might
make QEMU wait for a dirty sync that falls between two bursts and pause with less to send. It did not: QEMU
switched over after the same 2 memory rounds at 10, 20 and 50 ms on every hot-set guest, and the downtimes
differed only by the machine's noise (docs/libvirt.md, "Known problems").
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import libvirt_migration as lm

from host_engine.controller_config import ControllerConfig

CASES = (
    ("memory 8 MiB", 0),
    ("memory + disk", 0),
    ("memory + disk", 32),
    ("disk heavy", 0),
    ("memory stream", 48),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--reps", type=int, default=4, help="runs of every case and policy (default 4)")
    parser.add_argument("--initials", default="50,20,10", help="first limits, ms (default 50,20,10)")
    parser.add_argument("--timeout", type=float, default=30.0, help="per-migration bound, s (default 30)")
    parser.add_argument("--json", metavar="PATH", help="also write every run here")
    args = parser.parse_args(argv)
    try:
        initials = [int(x) for x in args.initials.split(",")]
    except ValueError:
        parser.error(f"--initials: comma-separated milliseconds, got {args.initials!r}")
    if any(i <= 0 for i in initials) or args.reps < 1:
        parser.error("--initials must be positive and --reps at least 1")
    missing = lm.missing_prerequisites()
    if missing:
        print(f"initial_limit: skipped (needs {', '.join(missing)})")
        return 0
    workloads = {w.name: w for w in lm.ALL_WORKLOADS}
    baseline, ours = lm.POLICIES[0], lm.POLICIES[-1]
    runs: list[dict[str, Any]] = []
    print("load", lm.loadavg(), flush=True)
    with lm.bench_harness("b-warmup") as harness:
        for rep in range(args.reps):
            for name, cap in CASES:
                for initial in [None, *initials]:
                    config = None if initial is None else ControllerConfig(initial_downtime_ms=initial)
                    pol = baseline if initial is None else ours
                    r = lm.migrate_once(
                        harness.hosts, harness.conns, workloads[name], cap, pol, args.timeout, config
                    )
                    row = {
                        "rep": rep,
                        "workload": name,
                        "cap": cap,
                        "policy": "base" if initial is None else f"ours@{initial}",
                        "outcome": r.outcome,
                        "downtime": r.downtime_ms,
                        "mib": round(r.bytes_transferred / lm.MiB),
                        "rounds": r.rounds,
                        "dur": round(r.duration_s, 1),
                        "limit": r.max_downtime_limit_ms,
                        "thr": round(r.throttle_pct_s),
                        "load": lm.loadavg(),
                    }
                    runs.append(row)
                    print(row, flush=True)
    print("load", lm.loadavg())
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1) + "\n")
    for name, cap in CASES:
        for policy in ["base", *[f"ours@{i}" for i in initials]]:
            rows = [r for r in runs if (r["workload"], r["cap"], r["policy"]) == (name, cap, policy)]
            d = [r["downtime"] for r in rows if r["downtime"] is not None]
            med = f"{statistics.median(d):.0f} [{min(d):.0f}-{max(d):.0f}]" if d else "-"
            print(
                f"{name:15} {cap:3} {policy:8} n={len(d)} downtime {med} MiB "
                f"{statistics.median([r['mib'] for r in rows]):.0f} rounds "
                f"{statistics.median([r['rounds'] for r in rows]):.0f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
