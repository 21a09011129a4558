"""Convergence on the simulated hypervisor: every workload model under the default controller.

For each workload, N seeds: an 8 GiB / 80 GiB droplet moved between two hosts with 10 Gbit/s NICs. Reports
downtime, throttle (percent x seconds), time under the disk write limit, duration, bytes sent / (disk +
memory), and how many runs converged. All times are simulated; the wall time per run is printed too.

    .venv/bin/python bench/convergence.py [--seeds 5] [--skip-shared] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from host_engine.attempt import MigrationResult, MigrationRun, run_concurrently, run_migration
from host_engine.controller import ControllerConfig, GiB
from host_engine.drivers.base import MigrationSpec
from host_engine.drivers.sim import DEFAULT_NIC_BPS, WORKLOADS, SimClock, SimHypervisor, SimWorld, Workload

MEMORY_BYTES = 8 * GiB
DISK_BYTES = 80 * GiB


@dataclass
class Row:
    workload: str
    results: list[MigrationResult]
    wall_s: list[float]


def migrate_once(workload: Workload, seed: int, config: ControllerConfig) -> tuple[MigrationResult, float]:
    world = SimWorld(seed)
    world.add_host("src", nic_bps=DEFAULT_NIC_BPS)
    world.add_host("dst", nic_bps=DEFAULT_NIC_BPS)
    world.add_droplet(
        "d", "src", memory_bytes=MEMORY_BYTES, disk_bytes=DISK_BYTES, vcpus=4, workload=workload
    )
    spec = MigrationSpec("m", "d", "src", "dst", "sim://src", "sim://dst", 4, MEMORY_BYTES, DISK_BYTES)
    driver = SimHypervisor(world).migration(spec)
    started = time.perf_counter()
    result = run_migration(driver, config, SimClock(world))
    wall = time.perf_counter() - started
    if result.converged and driver.verified is not True:
        raise AssertionError(f"{workload.name} seed {seed}: target differs from source at switchover")
    return result, wall


def run(seeds: int, config: ControllerConfig, factories: dict[str, Callable[[], Workload]]) -> list[Row]:
    rows = []
    for name, factory in factories.items():
        pairs = [migrate_once(factory(), seed, config) for seed in range(seeds)]
        rows.append(Row(name, [r for r, _ in pairs], [w for _, w in pairs]))
    return rows


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarise(row: Row) -> dict[str, object]:
    ok = [r for r in row.results if r.converged]
    down = [r.downtime_ms for r in ok if r.downtime_ms is not None]
    total = DISK_BYTES + MEMORY_BYTES
    return {
        "workload": row.workload,
        "converged": f"{len(ok)}/{len(row.results)}",
        "downtime_ms_median": _median(down),
        "downtime_ms_max": max(down) if down else None,
        "throttle_pct_s_median": _median([r.throttle_pct_s for r in row.results]),
        "disk_limit_s_median": _median([r.disk_limit_s for r in row.results]),
        "duration_s_median": _median([r.duration_s for r in row.results]),
        "bytes_ratio_median": _median([r.bytes_transferred / total for r in row.results]),
        "rounds_median": _median([float(r.rounds) for r in row.results]),
        "abort_reasons": sorted({r.abort_reason.value for r in row.results if r.abort_reason}),
        "wall_ms_median": _median([w * 1000 for w in row.wall_s]),
    }


def _fmt(v: object, spec: str = ".0f") -> str:
    return "-" if v is None else format(v, spec)


def markdown(summaries: list[dict[str, object]]) -> str:
    lines = [
        "| workload | converged | downtime ms (median / max) | throttle %·s | disk limit s | duration s "
        "| bytes ÷ (disk+mem) | rounds | wall ms/run |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in summaries:
        converged = str(s["converged"])
        if s["abort_reasons"]:
            converged += " (aborted: " + ", ".join(map(str, s["abort_reasons"])) + ")"  # type: ignore[call-overload]
        lines.append(
            f"| {s['workload']} | {converged} "
            f"| {_fmt(s['downtime_ms_median'])} / {_fmt(s['downtime_ms_max'])} "
            f"| {_fmt(s['throttle_pct_s_median'])} | {_fmt(s['disk_limit_s_median'], '.1f')} "
            f"| {_fmt(s['duration_s_median'], '.1f')} | {_fmt(s['bytes_ratio_median'], '.2f')} "
            f"| {_fmt(s['rounds_median'])} | {_fmt(s['wall_ms_median'])} |"
        )
    return "\n".join(lines)


def shared_nic(concurrent: int, seed: int, config: ControllerConfig) -> list[MigrationResult]:
    """``concurrent`` database droplets leaving one host at once, each to its own target: one NIC shared."""
    world = SimWorld(seed)
    world.add_host("src")
    runs = []
    for i in range(concurrent):
        world.add_host(f"dst{i}")
        world.add_droplet(
            f"d{i}",
            "src",
            memory_bytes=MEMORY_BYTES,
            disk_bytes=DISK_BYTES,
            vcpus=4,
            workload=WORKLOADS["database"](),
        )
        spec = MigrationSpec(f"m{i}", f"d{i}", "src", f"dst{i}", "", "", 4, MEMORY_BYTES, DISK_BYTES)
        runs.append(
            MigrationRun(SimHypervisor(world).migration(spec), config, SimClock(world), keep_trace=False)
        )
    return run_concurrently(runs, SimClock(world))


def shared_markdown(seeds: int, config: ControllerConfig) -> str:
    lines = [
        "| databases leaving one host at once | converged | downtime ms (median / max) "
        "| disk limit s (median) | duration s (median) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for n in (1, 2, 3, 4):
        results = [r for seed in range(seeds) for r in shared_nic(n, seed, config)]
        ok = [r for r in results if r.converged]
        down = [r.downtime_ms for r in ok if r.downtime_ms is not None]
        lines.append(
            f"| {n} | {len(ok)}/{len(results)} | {_fmt(_median(down))} / {_fmt(max(down) if down else None)} "
            f"| {_fmt(_median([r.disk_limit_s for r in results]), '.0f')} "
            f"| {_fmt(_median([r.duration_s for r in results]))} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--skip-shared", action="store_true", help="leave out the table of 1-4 databases sharing a source NIC"
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    rows = run(args.seeds, ControllerConfig(), dict(WORKLOADS))
    summaries = [summarise(r) for r in rows]
    if args.json:
        print(json.dumps(summaries, indent=2))
        return 0
    print(
        f"# {platform.python_implementation()} {platform.python_version()}, {platform.machine()}, "
        f"{args.seeds} seeds, {time.perf_counter() - started:.1f} s wall"
    )
    print(markdown(summaries))
    if not args.skip_shared:
        print()
        print(shared_markdown(args.seeds, ControllerConfig()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
