#!/usr/bin/env python3
"""Fleet benchmark: the engine as a fleet control plane on PostgreSQL (issue 12).

    .venv/bin/python bench/fleet.py [--hosts 1000] [--droplets 20000] [--evacuate 10] [--per-source 150]
        [--order 1,3,1,3] [--sim-speed 100] [--max-concurrent 4] [--max-minutes 2.5] [--small] [--json PATH]
        [--logs DIR]

``FLEET_BENCH_ENGINE`` names another worker command (e.g. a wrapper that profiles the workers).

A throwaway PostgreSQL (``tests/pg.py``) gets one generated fleet, built once with the store API and copied
for every run (``CREATE DATABASE ... TEMPLATE``): ``--hosts`` simulated hosts (``sim://``), ``--evacuate`` of
them holding ``--per-source`` droplets each, one more holding 200 (the ``plan evacuate`` subject, never
evacuated), the rest of ``--droplets`` spread over the others. Two real metadata servers (the project's
``metadata-server serve``, started by ``host_engine/lab/launch.py``): one serving the evacuated hosts, one
every other host, with
every droplet already registered (the engine's own start-up reconciliation, run once at build time; each run
starts from a copy of their state), so a completed move costs what it costs between two servers.

Each run, in ``--order`` (the 1- and 3-worker runs interleaved, so a busy neighbour hits both):

1. ``planner.evacuate`` of the ``--evacuate`` hosts (what ``host-engine evacuate`` does), with a short notice
   (``--notice-s``, unsafe on purpose) and ``[concurrency]``'s limits; the schedule's ``bandwidth`` is the
   simulated NIC x ``--sim-speed`` and its ``slot_overhead`` ``--slot-overhead-s``, so the plan is laid out at
   the pace the simulated fleet could run at within the limits;
2. N real ``host-engine run --driver sim --sim-speed S`` processes (what operators run), each with its own
   worker name and ``--metrics-listen``, until every migration is terminal or ``--max-minutes`` pass;
3. measured: migrations completed per minute (from the first planned window to the last completion), how
   far execution falls behind the plan (each migration's first start minus its planned ``not_before``), the
   engine tick p50/p99 (the workers' ``host_engine_tick_duration_seconds`` histograms, interpolated within
   buckets as Prometheus' ``histogram_quantile`` does), CPU per worker (its process tree, from /proc), admin
   requests per completed migration (the metadata servers' own ``metadata_server_requests_total``, by
   endpoint, monitoring endpoints left out), PostgreSQL connections (``pg_stat_activity`` of that database,
   sampled every second), and the most attempts running at once fleet-wide, out of one source and into one
   target, counted from the store's ``migration_log`` (``tests/fleet.py``), against the limits.

Then ``plan evacuate`` of the 200-droplet host: ``planner.preview_evacuation`` in-process (median of 5) and
the CLI ``host-engine --db URL plan evacuate HOST`` as a process (median of 3, interpreter start included).
Load average at the start and end of every run is in the results. Targets: every maximum ≤ its limit;
3 workers complete more per minute than 1; ``plan evacuate`` under 2 s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402

from bench._procs import cpu_seconds, tree  # noqa: E402
from bench._stats import machine, percentile  # noqa: E402
from host_engine import planner  # noqa: E402
from host_engine.config import DEFAULT_MAX_CONCURRENT, config_from_dict  # noqa: E402
from host_engine.drivers.sim.workloads import DEFAULT_NIC_BPS  # noqa: E402
from host_engine.lab.launch import MetadataServerProcess, free_port  # noqa: E402
from host_engine.metadata.reconcile import MetadataSync, default_client_factory  # noqa: E402
from host_engine.models import Droplet, Host  # noqa: E402
from host_engine.states import MigrationState  # noqa: E402
from host_engine.store import Store  # noqa: E402
from tests import pg  # noqa: E402
from tests.fleet import attempt_intervals, max_overlap  # noqa: E402

# The worker command (FLEET_BENCH_ENGINE: another one, e.g. a wrapper that profiles the workers).
BIN = Path(os.environ.get("FLEET_BENCH_ENGINE") or Path(sys.executable).parent / "host-engine")
GIB = 1024**3
HOST_SKU = (64, 512 * GIB, 8000 * GIB)
SIZES = [(1, 1 * GIB, 25 * GIB), (2, 2 * GIB, 50 * GIB), (2, 4 * GIB, 80 * GIB), (4, 8 * GIB, 160 * GIB)]
PLAN_HOST_DROPLETS = 200
_SAMPLE = re.compile(r"^(?P<name>[a-z_]+)\{(?P<labels>[^}]*)\} (?P<value>\S+)$")
MAINTENANCE = "/admin/v1/droplets/<droplet_id>/maintenance"
DROPLET = "/admin/v1/droplets/<droplet_id>"
LISTING = "/admin/v1/droplets"
TERMINAL = [s.value for s in MigrationState if s.is_terminal]


# ---- the fleet ---------------------------------------------------------------------------------------------


def source_name(i: int) -> str:
    return f"src-{i:03d}"


def generate(
    args: argparse.Namespace, urls: dict[str, str], tokens: dict[str, str]
) -> tuple[list[Host], list[Droplet]]:
    """Hosts and droplets from a fixed seed: the evacuated hosts, the plan subject, the rest."""
    rng = random.Random(7)
    hosts: list[Host] = []

    def host(name: str, server: str) -> Host:
        return Host(
            name, "dc1", *HOST_SKU, hypervisor_uri=f"sim://{name}",
            metadata_url=urls[server], metadata_token_file=tokens[server],
        )  # fmt: skip

    sources = [source_name(i) for i in range(args.evacuate)]
    others = [f"hv-{i:04d}" for i in range(args.hosts - args.evacuate - 1)]
    hosts += [host(s, "sources") for s in sources]
    hosts.append(host("plan-000", "others"))
    hosts += [host(o, "others") for o in others]
    placed = [h for s in sources for h in [s] * args.per_source] + ["plan-000"] * PLAN_HOST_DROPLETS
    rest = max(0, args.droplets - len(placed))
    placed += [others[i % len(others)] for i in range(rest)]
    droplets = []
    for i, h in enumerate(placed):
        v, m, d = rng.choice(SIZES)
        droplets.append(
            Droplet(f"d{i:05d}", h, v, m, d, addresses=(f"10.{i // 62500}.{i // 250 % 250}.{i % 250 + 1}",))
        )
    return hosts, droplets


@contextmanager
def metadata_server(workdir: Path, ports: tuple[int, int], token: str) -> Iterator[MetadataServerProcess]:
    """A metadata server on fixed ports (the hosts' URLs name them) over the state in ``workdir``."""
    ms = MetadataServerProcess(workdir, ports[0], ports[1], token)
    ms.launch()
    try:
        yield ms
    finally:
        ms.stop()


def admin_requests(ms: MetadataServerProcess) -> Counter[str]:
    """Admin requests the server answered, by endpoint (monitoring endpoints left out)."""
    counts: Counter[str] = Counter()
    for line in ms.admin("GET", "/metrics", timeout=30).text.splitlines():
        m = _SAMPLE.match(line)
        if m is None or m.group("name") != "metadata_server_requests_total":
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group("labels")))
        if labels.get("listener") == "admin" and labels.get("endpoint") not in ("/metrics", "/healthz"):
            counts[labels["endpoint"]] += int(float(m.group("value")))
    return counts


def psql(server: pg.PostgresServer, sql: str, dbname: str = "postgres") -> None:
    with psycopg.connect(
        host="127.0.0.1", port=server.port, user=server.user, dbname=dbname, autocommit=True
    ) as conn:
        conn.execute(sql)


def register_all(hosts: list[Host], droplets: list[Droplet], threads: int = 16) -> None:
    """Register every droplet at its host's server as the engine's reconciliation would, on ``threads``
    connections at once (the engine's own loop does them one by one: minutes for 20,000)."""
    by_name = {h.name: h for h in hosts}
    make = default_client_factory(timeout_s=30)
    chunks = [droplets[i::threads] for i in range(threads)]

    def work(chunk: list[Droplet]) -> None:
        clients: dict[str, Any] = {}
        for d in chunk:
            host = by_name[d.host]
            client = clients.get(host.metadata_url) or clients.setdefault(host.metadata_url, make(host))
            MetadataSync.register(client, d, host)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, chunks))


# ---- one run -----------------------------------------------------------------------------------------------


def hist_quantile(buckets: dict[float, float], q: float) -> float | None:
    """``histogram_quantile`` over cumulative buckets (upper bound -> count)."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] == 0:
        return None
    rank = q * buckets[bounds[-1]]
    prev_b, prev_c = 0.0, 0.0
    for b in bounds:
        c = buckets[b]
        if c >= rank:
            if b == float("inf"):
                return prev_b
            return prev_b + (b - prev_b) * ((rank - prev_c) / (c - prev_c) if c > prev_c else 0.0)
        prev_b, prev_c = b, c
    return bounds[-1]


def tick_buckets(port: int) -> dict[float, float]:
    import requests

    out: dict[float, float] = {}
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    for line in text.splitlines():
        if line.startswith("host_engine_tick_duration_seconds_bucket"):
            le = re.search(r'le="([^"]+)"', line)
            assert le is not None
            out[float(le.group(1))] = float(line.rsplit(" ", 1)[1])
    return out


def plan_run(url: str, args: argparse.Namespace, limits: dict[str, int]) -> tuple[dict[str, datetime], float]:
    """Evacuate the source hosts; the planned ``not_before`` of every migration and the planning time."""
    config = config_from_dict(
        {
            "concurrency": limits,
            "schedule": {
                "bandwidth": int(DEFAULT_NIC_BPS * args.sim_speed),
                "slot_overhead": f"{args.slot_overhead_s}s",
            },
        }
    )
    planned: dict[str, datetime] = {}
    with Store.open(url) as store:
        started = time.monotonic()
        start = store.now() + timedelta(seconds=args.notice_s + args.lead_s)
        request = planner.Request(
            start=start,
            notice=timedelta(seconds=args.notice_s),
            limits=planner.Limits(**limits),
            reason="bench",
            requested_by="bench",
            unsafe_short_notice=True,
        )
        for i in range(args.evacuate):
            # On a loaded machine planning the hosts may outlast the lead: a host planned too late for the
            # common start starts as soon as its notice allows.
            soonest = store.now() + timedelta(seconds=args.notice_s + 1)
            if request.start < soonest:
                request = dataclasses.replace(request, start=soonest)
            _schedule, written = planner.evacuate(store, source_name(i), request, config)
            planned.update({m.id: m.not_before for m in written})
        return planned, time.monotonic() - started


def one_run(  # noqa: PLR0912 - one run, measured in one place
    server: pg.PostgresServer,
    template: str,
    k: int,
    workers: int,
    args: argparse.Namespace,
    ms_state: dict[str, tuple[Path, tuple[int, int], str]],
    tmp: Path,
) -> dict[str, Any]:
    limits = {
        "max_parallel": args.max_parallel,
        "max_per_source": args.max_per_source,
        "max_per_target": args.max_per_target,
    }
    db = f"run_{k}_{workers}w"
    psql(server, f'CREATE DATABASE "{db}" TEMPLATE "{template}"')
    url = server.url(db)
    runs_dir = tmp / db
    load_start = os.getloadavg()
    with contextlib_exit() as stack:
        servers = {}
        for role, (state_dir, ports, token) in ms_state.items():
            work = runs_dir / role
            shutil.copytree(state_dir, work)
            servers[role] = stack.enter_context(metadata_server(work, ports, token))
        before = {role: admin_requests(ms) for role, ms in servers.items()}
        planned, plan_s = plan_run(url, args, limits)
        total = len(planned)
        settings = [a for key, v in limits.items() for a in ("--set", f"concurrency.{key}={v}")]
        settings += ["--set", f"engine.max_concurrent={args.max_concurrent}"]
        log_path = runs_dir / "workers.log"
        procs: list[subprocess.Popen[bytes]] = []
        worker_ports = [free_port() for _ in range(workers)]
        t0 = time.time()
        with log_path.open("ab") as out:
            for n in range(workers):
                argv = [
                    str(BIN), "--db", url, *settings, "run", "--worker", f"w{n + 1}",
                    "--driver", "sim", "--sim-speed", str(args.sim_speed),
                    "--poll-interval", args.poll_interval, "--metrics-listen", f"127.0.0.1:{worker_ports[n]}",
                ]  # fmt: skip
                procs.append(subprocess.Popen(argv, stdout=out, stderr=out, cwd=ROOT, start_new_session=True))
        conns: list[int] = []
        loads: list[float] = []  # /proc/loadavg's 1-minute figure, every second of the run
        done = 0
        ticks: dict[float, float] = {}
        cpu_s: list[float] = []
        deadline = time.monotonic() + args.max_minutes * 60
        try:
            with psycopg.connect(
                host="127.0.0.1", port=server.port, user=server.user, dbname=db, autocommit=True
            ) as conn:
                while time.monotonic() < deadline:
                    if any(p.poll() is not None for p in procs):
                        raise RuntimeError(f"a worker exited early: {log_path.read_text()[-3000:]}")
                    row = conn.execute(
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE datname = %s AND pid <> pg_backend_pid()",
                        (db,),
                    ).fetchone()
                    conns.append(int(row[0]) if row else 0)
                    loads.append(os.getloadavg()[0])
                    row = conn.execute(
                        "SELECT count(*) FROM migrations WHERE state = ANY(%s)", (TERMINAL,)
                    ).fetchone()
                    done = int(row[0]) if row else 0
                    if done >= total:
                        break
                    time.sleep(1.0)
            wall = time.time() - t0
            for port in worker_ports:
                for b, c in tick_buckets(port).items():
                    ticks[b] = ticks.get(b, 0.0) + c
            cpu_s = [cpu_seconds(tree(p.pid)) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait(10)
        after = {role: admin_requests(ms) for role, ms in servers.items()}
    load_end = os.getloadavg()
    if args.logs:
        Path(args.logs).mkdir(parents=True, exist_ok=True)
        shutil.copy(log_path, Path(args.logs) / f"{db}.log")

    with Store.open(url) as store:
        migrations = {m.id: m for m in store.list_migrations()}
        intervals = attempt_intervals(store)
    first_start: dict[str, datetime] = {}
    for iv in intervals:
        if iv.migration_id not in first_start or iv.start < first_start[iv.migration_id]:
            first_start[iv.migration_id] = iv.start
    completed = [m for m in migrations.values() if m.state is MigrationState.COMPLETED]
    states = Counter(m.state.value for m in migrations.values())
    lag = [(first_start[mid] - nb).total_seconds() for mid, nb in planned.items() if mid in first_start]
    never_started = sum(1 for mid in planned if mid not in first_start)
    # A window that opened before the run ended with its migration not started yet is at least this late.
    run_end = datetime.fromtimestamp(t0 + wall, UTC)
    lag_all = lag + [
        (run_end - nb).total_seconds()
        for mid, nb in planned.items()
        if mid not in first_start and nb < run_end
    ]
    notified = sum(1 for m in migrations.values() if m.notified_at is not None)
    first_window = min(planned.values())
    ends = [
        iv.end
        for iv in intervals
        if iv.end is not None and migrations[iv.migration_id].state is MigrationState.COMPLETED
    ]
    last_end = max(ends) if ends else datetime.now(UTC)
    span_s = max(1e-9, (last_end - first_window).total_seconds())
    overlap = max_overlap(intervals)
    # What one completed attempt took: wall time (the store's log) and simulated time (the attempt's record),
    # and how many ran at once on average over the run (Little's law: rate = running / duration).
    attempt_wall = [
        (iv.end - iv.start).total_seconds()
        for iv in intervals
        if iv.end is not None and migrations[iv.migration_id].state is MigrationState.COMPLETED
    ]
    attempt_sim = [float(m.stats.get("last_attempt", {}).get("duration_s", 0.0)) for m in completed]
    busy_s = sum(
        ((iv.end or run_end) - iv.start).total_seconds() for iv in intervals if iv.start >= first_window
    )
    requests = Counter[str]()
    for role in servers:
        requests.update(after[role] - before[role])
    n_admin = sum(requests.values())
    return {
        "workers": workers,
        "database": db,
        "load_average_start": list(load_start),
        "load_average_end": list(load_end),
        "load_average_1m_during": {
            "mean": round(statistics.mean(loads), 2) if loads else None,
            "max": round(max(loads), 2) if loads else None,
        },
        "migrations": total,
        "states": dict(states),
        "completed": len(completed),
        "finished": done >= total,
        "wall_s": round(wall, 1),
        "plan_10_hosts_s": round(plan_s, 2),
        "plan_span_s": round((max(planned.values()) - first_window).total_seconds(), 1),
        "execution_span_s": round(span_s, 1),
        "completed_per_minute": round(len(completed) / span_s * 60, 1),
        "lag_at_least_s": {  # unstarted migrations whose window opened count with (end of run - window)
            "p50": round(percentile(lag_all, 50), 1) if lag_all else None,
            "p99": round(percentile(lag_all, 99), 1) if lag_all else None,
        },
        "notified": notified,
        "worker_warnings": warnings(log_path),
        "lag_s": {
            "p50": round(percentile(lag, 50), 1) if lag else None,
            "p99": round(percentile(lag, 99), 1) if lag else None,
            "max": round(max(lag), 1) if lag else None,
            "never_started": never_started,
        },
        "tick_s": {
            "p50": _round(hist_quantile(dict(ticks), 0.5)),
            "p99": _round(hist_quantile(dict(ticks), 0.99)),
            "count": int(ticks.get(float("inf"), 0)),
        },
        "cpu_s_per_worker": [round(c, 1) for c in cpu_s],
        "cpu_pct_of_a_core_per_worker": [round(100 * c / wall, 1) for c in cpu_s],
        "admin_requests": dict(sorted(requests.items())),
        "admin_requests_per_migration": round(n_admin / max(1, len(completed)), 2),
        # each notice once per notified migration, the move's requests once per completed one, the listings
        # of the periodic reconciliation apart
        "admin_requests_per_migration_by_phase": {
            "notice": round(requests[MAINTENANCE] / max(1, notified), 2),
            "completion": round(requests[DROPLET] / max(1, len(completed)), 2),
            "reconcile_listings": requests[LISTING],
        },
        "completed_attempt_wall_s": _spread(attempt_wall),
        "completed_attempt_sim_s": _spread(attempt_sim),
        "mean_running": round(busy_s / max(1e-9, (run_end - first_window).total_seconds()), 1),
        "pg_connections": {"max": max(conns, default=0), "median": statistics.median(conns) if conns else 0},
        "limits": limits,
        "max_concurrent_per_worker": args.max_concurrent,
        "max_seen": {
            "fleet": overlap.fleet,
            "per_source": max(overlap.per_source.values(), default=0),
            "per_target": max(overlap.per_target.values(), default=0),
        },
        "within_limits": overlap.fleet <= limits["max_parallel"]
        and max(overlap.per_source.values(), default=0) <= limits["max_per_source"]
        and max(overlap.per_target.values(), default=0) <= limits["max_per_target"],
    }


def warnings(log_path: Path) -> dict[str, int]:
    """The workers' WARNING/ERROR lines, by message with ids and numbers blanked, most frequent first."""
    counts: Counter[str] = Counter()
    for line in log_path.read_text(errors="replace").splitlines():
        for level in (" WARNING ", " ERROR ", "<4>", "<3>"):
            if level in line:
                msg = line.split(level, 1)[1]
                counts[re.sub(r"[0-9a-f]{6,}|\d+(\.\d+)?", "#", msg)[:160]] += 1
                break
    return dict(counts.most_common(12))


def _spread(xs: list[float]) -> dict[str, float | None]:
    """p50/p90/max of a list of seconds (None when empty)."""
    if not xs:
        return {"p50": None, "p90": None, "max": None}
    return {
        "p50": round(percentile(xs, 50), 1),
        "p90": round(percentile(xs, 90), 1),
        "max": round(max(xs), 1),
    }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


@contextmanager
def contextlib_exit() -> Iterator[Any]:
    import contextlib

    with contextlib.ExitStack() as stack:
        yield stack


# ---- plan evacuate -----------------------------------------------------------------------------------------


def time_plan(url: str) -> dict[str, Any]:
    config = config_from_dict({})
    inproc = []
    with Store.open(url) as store:
        for _ in range(5):
            started = time.perf_counter()
            plan = planner.preview_evacuation(store, "plan-000", config)
            inproc.append(time.perf_counter() - started)
        placed = sum(1 for c in plan.choices if c.target)
    cli = []
    for _ in range(3):
        started = time.perf_counter()
        out = subprocess.run(
            [str(BIN), "--db", url, "plan", "evacuate", "plan-000"],
            capture_output=True,
            text=True,
            check=False,
        )
        cli.append(time.perf_counter() - started)
        if out.returncode != 0:
            raise RuntimeError(f"plan evacuate failed: {out.stderr.strip()}")
    return {
        "droplets": PLAN_HOST_DROPLETS,
        "placed": placed,
        "in_process_s": [round(x, 3) for x in inproc],
        "in_process_median_s": round(statistics.median(inproc), 3),
        "cli_s": [round(x, 3) for x in cli],
        "cli_median_s": round(statistics.median(cli), 3),
    }


# ---- main --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hosts", type=int, default=1000)
    p.add_argument("--droplets", type=int, default=20000)
    p.add_argument("--evacuate", type=int, default=10, help="hosts evacuated at once")
    p.add_argument("--per-source", type=int, default=150, help="droplets on each evacuated host")
    p.add_argument(
        "--order", default=None, help="worker counts of the runs, in order (default 1,3,1,3; --small 1,3)"
    )
    p.add_argument("--sim-speed", type=float, default=100.0)
    p.add_argument("--poll-interval", default="200ms")
    p.add_argument("--notice-s", type=float, default=20.0)
    p.add_argument("--lead-s", type=float, default=20.0, help="start = now + notice + this")
    p.add_argument("--slot-overhead-s", type=float, default=2.0)
    p.add_argument("--max-parallel", type=int, default=24)
    p.add_argument("--max-per-source", type=int, default=3)
    p.add_argument("--max-per-target", type=int, default=2)
    p.add_argument(
        "--max-concurrent",
        type=int,
        default=DEFAULT_MAX_CONCURRENT,
        help="[engine] max_concurrent of each worker (default: the engine's)",
    )
    p.add_argument("--max-minutes", type=float, default=2.5, help="bound of each run")
    p.add_argument("--logs", default=None, help="keep each run's worker log in this directory")
    p.add_argument("--small", action="store_true", help="a quick check: 60 hosts, 2 evacuated, 1,3")
    p.add_argument(
        "--json", default=None, help="results file (default bench/results/fleet.json; --small: none)"
    )
    args = p.parse_args(argv)
    if args.order is None:
        args.order = "1,3" if args.small else "1,3,1,3"
    if args.small:
        args.hosts, args.droplets, args.evacuate, args.per_source = 60, 600, 2, 20
        args.max_minutes, args.notice_s, args.lead_s = min(args.max_minutes, 1.0), 5.0, 8.0
        args.max_parallel, args.max_concurrent = 6, 4
    return args


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # so the workers, servers and PostgreSQL are stopped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    order = [int(x) for x in args.order.split(",") if x.strip()]
    results: dict[str, Any] = {
        "benchmark": "fleet",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        # what the workers ran besides the commit: files of the engine changed in the working tree then
        "uncommitted_engine_files": subprocess.run(
            ["git", "status", "--porcelain", "host_engine"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.split("\n")[:-1],
        "parameters": {k: v for k, v in vars(args).items() if k != "json"},
        "load_average_start": list(os.getloadavg()),
    }
    tmp = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    try:
        with pg.postgres_server() as server:
            template = "fleet_template"
            psql(server, f'CREATE DATABASE "{template}"')
            turl = server.url(template)
            ms_state: dict[str, tuple[Path, tuple[int, int], str]] = {}
            roles = ("sources", "others")
            for role in roles:
                ms_state[role] = (tmp / "ms" / role, (free_port(), free_port()), os.urandom(16).hex())
            urls = {r: f"http://127.0.0.1:{ms_state[r][1][1]}" for r in roles}
            tokens = {r: str(ms_state[r][0] / "admin-token") for r in roles}
            started = time.monotonic()
            hosts, droplets = generate(args, urls, tokens)
            with Store.open(turl) as store, store.begin() as tx:
                for h in hosts:
                    tx.add_host(h)
                for d in droplets:
                    tx.add_droplet(d)
            build_s = time.monotonic() - started
            print(f"fleet: {len(hosts)} hosts, {len(droplets)} droplets in {build_s:.1f} s", flush=True)
            started = time.monotonic()
            with contextlib_exit() as stack:
                for role in roles:
                    stack.enter_context(metadata_server(*ms_state[role]))
                register_all(hosts, droplets)
                with Store.open(turl) as store, MetadataSync(store) as sync:
                    sync.reconcile_all()  # what the engine's start-up does: nothing left to do now
            register_s = time.monotonic() - started
            print(f"metadata servers: every droplet registered in {register_s:.1f} s", flush=True)
            results["build_s"] = round(build_s, 1)
            results["register_s"] = round(register_s, 1)
            results["plan_evacuate"] = time_plan(turl)
            print(f"plan evacuate: {results['plan_evacuate']}", flush=True)
            runs = []
            for k, n in enumerate(order):
                r = one_run(server, template, k, n, args, ms_state, tmp)
                runs.append(r)
                print(json.dumps(r), flush=True)
            results["runs"] = runs
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["load_average_end"] = list(os.getloadavg())
    by: dict[int, list[dict[str, Any]]] = {}
    for r in results["runs"]:
        by.setdefault(r["workers"], []).append(r)
    results["medians"] = {
        str(n): {
            "completed_per_minute": statistics.median(r["completed_per_minute"] for r in rs),
            "lag_p50_s": statistics.median(r["lag_s"]["p50"] or 0 for r in rs),
            "lag_p99_s": statistics.median(r["lag_s"]["p99"] or 0 for r in rs),
            "tick_p50_s": statistics.median(r["tick_s"]["p50"] or 0 for r in rs),
            "tick_p99_s": statistics.median(r["tick_s"]["p99"] or 0 for r in rs),
            "cpu_pct_per_worker": statistics.median(c for r in rs for c in r["cpu_pct_of_a_core_per_worker"]),
            "admin_requests_per_migration": statistics.median(r["admin_requests_per_migration"] for r in rs),
            "pg_connections_max": max(r["pg_connections"]["max"] for r in rs),
            "mean_running": statistics.median(r["mean_running"] for r in rs),
            "completed_attempt_wall_p50_s": statistics.median(
                r["completed_attempt_wall_s"]["p50"] or 0 for r in rs
            ),
            "completed_attempt_sim_p50_s": statistics.median(
                r["completed_attempt_sim_s"]["p50"] or 0 for r in rs
            ),
            "load_average_1m_during_mean": statistics.median(
                r["load_average_1m_during"]["mean"] or 0 for r in rs
            ),
        }
        for n, rs in sorted(by.items())
    }
    results["targets"] = {
        "within_limits": all(r["within_limits"] for r in results["runs"]),
        "three_beat_one": (
            by.get(3) is not None
            and by.get(1) is not None
            and results["medians"]["3"]["completed_per_minute"]
            > results["medians"]["1"]["completed_per_minute"]
        ),
        "plan_evacuate_under_2s": results["plan_evacuate"]["cli_median_s"] < 2.0,
    }
    print(json.dumps({"medians": results["medians"], "targets": results["targets"]}, indent=2))
    out = args.json or (None if args.small else str(ROOT / "bench" / "results" / "fleet.json"))
    if out:
        Path(out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"results: {out}")
    return 0 if results["targets"]["within_limits"] else 1


if __name__ == "__main__":
    sys.exit(main())
