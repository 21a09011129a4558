#!/usr/bin/env python3
"""Placement benchmark: plan the evacuation of a 200-droplet host in a generated 10,000-host fleet.

    .venv/bin/python bench/placement.py [--hosts 10000] [--droplets 200] [--runs 5] [--json PATH]

The fleet is generated from a seed (same fleet every run): every host in the source's datacenter, 90 % in its
compatibility group, 3 % not active, four hardware sizes, each host already 20-80 % committed, a third of the
droplets carrying one of 500 owner tags (anti-affinity on). That is the worst case for the filters: every host
is a candidate for every droplet. Three things are timed:

* ``placement`` — ``Placer`` over the in-memory fleet (build + place all droplets): the algorithm alone;
* ``plan evacuate`` — ``planner.preview_evacuation`` on a SQLite store holding the whole fleet (hosts, every
  droplet): what ``host-engine plan evacuate HOST`` does, reading included;
* ``evacuate --dry-run`` — ``planner.evacuate`` (validation, lock, placement, spacing) without the write; then
  one real ``evacuate`` writing 200 migrations in one transaction.

Peak memory is measured in a separate run under ``tracemalloc`` (Python allocations of that step), since
tracing slows the code it measures; the process's max RSS is reported too. Target (issue 5): under 2 s.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from host_engine import planner, schema
from host_engine.config import EngineConfig
from host_engine.models import Droplet, Host, Usage
from host_engine.placement import Placer
from host_engine.states import HostState
from host_engine.store import Store

GIB = 1024**3
SKUS = [
    (32, 128 * GIB, 2000 * GIB),
    (48, 256 * GIB, 4000 * GIB),
    (64, 384 * GIB, 8000 * GIB),
    (96, 768 * GIB, 8000 * GIB),
]
SIZES = [(1, 1 * GIB, 25 * GIB), (2, 4 * GIB, 80 * GIB), (4, 8 * GIB, 160 * GIB), (8, 32 * GIB, 320 * GIB)]
START = datetime(2030, 1, 1, tzinfo=UTC)


def generate(n_hosts: int, n_source_droplets: int, seed: int = 7) -> tuple[list[Host], list[Droplet]]:
    rng = random.Random(seed)
    hosts = [
        Host(
            "src-0000",
            "dc1",
            96,
            768 * GIB,
            8000 * GIB,
            "epyc-7",
            HostState.ACTIVE,
            metadata_url="http://127.0.0.1:9",
        )
    ]
    droplets: list[Droplet] = []
    tags = [f"owner-{i}" for i in range(500)]
    did = 0

    def droplet(host: str) -> Droplet:
        nonlocal did
        did += 1
        v, m, d = rng.choice(SIZES)
        tag = rng.choice(tags) if rng.random() < 0.33 else ""
        return Droplet(
            f"d{did:07d}", host, v, m, d, tag, (f"10.{did >> 16 & 255}.{did >> 8 & 255}.{did & 255}",)
        )

    for _ in range(n_source_droplets):
        droplets.append(droplet("src-0000"))
    for i in range(1, n_hosts):
        v, m, d = rng.choice(SKUS)
        state = (
            HostState.ACTIVE if rng.random() > 0.03 else rng.choice([HostState.MAINTENANCE, HostState.DOWN])
        )
        group = "epyc-7" if rng.random() < 0.9 else "epyc-9"
        name = f"hv-{i:05d}"
        hosts.append(Host(name, "dc1", v, m, d, group, state, metadata_url="http://127.0.0.1:9"))
        target = rng.uniform(0.2, 0.8) * m
        used = 0
        while used < target:
            dr = droplet(name)
            used += dr.memory_bytes
            droplets.append(dr)
    return hosts, droplets


def usage_and_tags(droplets: list[Droplet]) -> tuple[dict[str, Usage], dict[str, set[str]]]:
    usage: dict[str, Usage] = {}
    tags: dict[str, set[str]] = {}
    for d in droplets:
        usage[d.host] = usage.get(d.host, Usage()).plus(d.vcpus, d.memory_bytes, d.disk_bytes)
        if d.owner_tag:
            tags.setdefault(d.host, set()).add(d.owner_tag)
    return usage, tags


def load_store(path: Path, hosts: list[Host], droplets: list[Droplet]) -> Store:
    store = Store.open(path, clock=lambda: START)
    now = START
    with store.engine.begin() as conn:
        conn.execute(
            schema.hosts.insert(),
            [
                {"name": h.name, "datacenter": h.datacenter, "compat_group": h.compat_group, "vcpus": h.vcpus,
                 "memory_bytes": h.memory_bytes, "disk_bytes": h.disk_bytes, "state": h.state.value,
                 "hypervisor_uri": "", "metadata_url": h.metadata_url, "metadata_token_file": "",
                 "state_reason": "", "state_changed_by": "", "created_at": now, "updated_at": now}
                for h in hosts
            ],
        )  # fmt: skip
        conn.execute(
            schema.droplets.insert(),
            [
                {"id": d.id, "host": d.host, "vcpus": d.vcpus, "memory_bytes": d.memory_bytes,
                 "disk_bytes": d.disk_bytes, "owner_tag": d.owner_tag, "addresses": list(d.addresses),
                 "hostname": d.id, "power_state": "running", "created_at": now, "updated_at": now}
                for d in droplets
            ],
        )  # fmt: skip
    return store


def timed(fn: Callable[[], Any], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def peak_bytes(fn: Callable[[], Any]) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", type=int, default=10_000)
    ap.add_argument("--droplets", type=int, default=200)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args()

    t0 = time.perf_counter()
    hosts, droplets = generate(args.hosts, args.droplets)
    gen_s = time.perf_counter() - t0
    source = hosts[0]
    to_move = [d for d in droplets if d.host == source.name]
    usage, tags = usage_and_tags(droplets)
    cfg = EngineConfig()
    print(f"fleet: {len(hosts)} hosts, {len(droplets)} droplets, {len(to_move)} on {source.name} "
          f"(generated in {gen_s:.1f} s)")  # fmt: skip

    plans = []

    def place() -> None:
        plan = Placer(hosts, usage, tags, cfg.placement).place(to_move, source)
        plans.append(plan)

    rows: list[dict[str, Any]] = []
    place_s = timed(place, args.runs)
    unplaced = len(plans[-1].unplaced)
    assert all(p == plans[0] for p in plans), "placement is not deterministic"
    rows.append({"step": "placement (in memory)", "times_s": place_s, "peak_bytes": peak_bytes(place)})

    with tempfile.TemporaryDirectory(prefix="bench-placement-") as tmp:
        t0 = time.perf_counter()
        store = load_store(Path(tmp) / "fleet.db", hosts, droplets)
        load_s = time.perf_counter() - t0
        print(f"store: SQLite loaded in {load_s:.1f} s")

        def preview() -> None:
            planner.preview_evacuation(store, source.name, cfg)

        store_runs = max(3, args.runs)
        rows.append(
            {"step": "plan evacuate (SQLite store)", "times_s": timed(preview, store_runs),
             "peak_bytes": peak_bytes(preview)}
        )  # fmt: skip
        request = planner.Request(
            START + timedelta(hours=1), timedelta(minutes=10), planner.Limits(8, 2, 8), "bench", "bench"
        )

        def dry_run() -> None:
            planner.evacuate(store, source.name, request, cfg, dry_run=True)

        rows.append(
            {"step": "evacuate --dry-run (SQLite store)", "times_s": timed(dry_run, store_runs),
             "peak_bytes": peak_bytes(dry_run)}
        )  # fmt: skip
        written: list[Any] = []

        def real() -> None:
            written.extend(planner.evacuate(store, source.name, request, cfg)[1])

        rows.append(
            {
                "step": "evacuate, writing 200 migrations (SQLite)",
                "times_s": timed(real, 1),
                "peak_bytes": None,
            }
        )
        assert len(written) == len(to_move) - unplaced
        store.close()

    maxrss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print()
    print("| step | median s | min s | max s | runs | peak traced memory |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        t = r["times_s"]
        peak = f"{r['peak_bytes'] / 2**20:.1f} MiB" if r["peak_bytes"] is not None else "-"
        print(
            f"| {r['step']} | {statistics.median(t):.3f} | {min(t):.3f} | {max(t):.3f} | {len(t)} | {peak} |"
        )
    print(f"\nunplaced droplets: {unplaced}; process max RSS {maxrss_mib:.0f} MiB; "
          f"Python {platform.python_version()} on {platform.machine()}")  # fmt: skip
    if args.json_path:
        Path(args.json_path).write_text(
            json.dumps(
                {"hosts": len(hosts), "droplets": len(droplets), "moved": len(to_move), "unplaced": unplaced,
                 "rows": rows, "max_rss_mib": maxrss_mib, "python": platform.python_version()},
                indent=2,
            )
        )  # fmt: skip
    worst = max(statistics.median(r["times_s"]) for r in rows[:3])
    print(f"target < 2 s: {'met' if worst < 2 else 'MISSED'} (slowest median {worst:.3f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
