"""Live migration on real libvirt: our controller against libvirt's defaults and auto-converge, side by side.

Two real libvirt hosts on this machine (``tests/libvirt_harness``: two network namespaces, one libvirtd each,
TCG guests) and the harness's boot-sector guest, which dirties memory and writes its disk at set rates.
For each workload, uncapped and at its bandwidth cap, the same guest, built afresh for every run, is
live-migrated hostA -> hostB by the engine's ``LibvirtMigration`` under ``run_migration`` (the executor's
loop), with four policies, interleaved (every repetition runs every case once, so a load change on the
shared machine hits all policies alike):

- ``libvirt defaults``: plain ``migrateToURI3`` with LIVE | PEER2PEER | NON_SHARED_DISK | PERSIST_DEST |
  UNDEFINE_SOURCE, no auto-converge, and no action while it runs;
- ``auto-converge``: the same plus ``VIR_MIGRATE_AUTO_CONVERGE`` with QEMU's own policy (20 % + 10 % per
  round, up to 99 %), and no action while it runs;
- ``auto-converge + cap``: the same with QEMU's throttle capped at 80 % (``max-cpu-throttle``), the cap
  our controller uses;
- ``ours``: the engine's convergence controller with its default ``ControllerConfig`` (it picks the CPU
  throttle level, applies the temporary disk write limit, hands QEMU a 50 ms downtime limit first and
  raises it toward the 300 ms budget when rounds stop shrinking the remainder, gives up on a guest that
  cannot converge), with the engine's transport: the disk mirror in write-blocking mode
  (``NON_SHARED_SYNCHRONOUS_WRITES``) and memory over 4 connections (multifd, ``PARALLEL``), the driver's
  defaults. The baselines keep libvirt's own (background mirror, one connection).

Every policy gets the same bandwidth cap and the same 300 ms downtime budget: the baselines hand QEMU
300 ms from the start (QEMU's default), ours starts at 50 ms (the ramp); each run records the largest limit
QEMU held (``migrateGetMaxDowntime``, sampled every tick). Every run is bounded: after ``--timeout``
seconds (default 60) the bench aborts the job (``abortJob``) and records it as not converged. Downtime and
bytes come from libvirt's job statistics; the throttle is QEMU's own figure (``jobStats``
``auto_converge_throttle``), sampled every tick, whichever policy set it. The summary gives, per case,
the median of ``--reps`` runs (default 3) and the spread.

    sudo .venv/bin/python bench/libvirt_migration.py [--quick] [--reps 3] [--timeout 60] [--workload NAME ...]
                                                     [--json bench/results/libvirt_migration.json]

Needs root, libvirtd, qemu-system-x86_64, qemu-img, binutils and libvirt-python; without them it prints a
skip line and exits 0 (so ``bench/run_all.py`` passes on machines without libvirt). Everything the harness
starts (daemons, QEMU processes, namespaces, directories) is torn down at the end, also on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The harness helpers live in bench/libvirt_bench_harness.py; all of them stay importable from here (F401: the
# ones this script does not use itself are re-exported for scripts built on it, such as bench/probes/).
from bench.libvirt_bench_harness import (  # noqa: E402, F401
    COUNTER_WAIT_S,
    NEEDED_BINARIES,
    bench_harness,
    counter_advances,
    holds,
    missing_prerequisites,
    namespace_pids,
    remove_everywhere,
    start_guest,
    teardown_check,
)

MiB = 1024 * 1024
TICK_S = 0.25
DEFAULT_TIMEOUT_S = 60.0
QUICK_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Workload:
    name: str
    what: str
    guest: dict[str, Any]  # GuestSpec fields
    cap_mibps: int


WORKLOADS = (
    Workload(
        "memory 8 MiB",
        "8 MiB of memory rewritten 18x/s (paced), no disk writes",
        {"mem_kib": 8 * 1024, "disk_sectors": 0, "paced": True},
        32,
    ),
    Workload(
        "memory 48 MiB",
        "48 MiB of memory rewritten 18x/s, spread over each 55 ms tick, cannot converge at the cap",
        # 16 passes a tick, each 3 MiB further through the 48 MiB set (guest.S SUBTICKS): every page is
        # rewritten 18x/s, as by "memory 48 MiB burst", but not all in the same millisecond.
        {"mem_kib": 3 * 1024, "mem_span_kib": 48 * 1024, "subticks": 16, "disk_sectors": 32, "paced": True},
        32,
    ),
    Workload(
        "memory + disk",
        "8 MiB/s memory + 2 MiB/s disk writes (paced)",
        # GuestSpec.at_rates(memory_dirty_bps=8 MiB, disk_write_bps=2 MiB), spelled out.
        {"mem_kib": 450, "disk_sectors": 224, "paced": True, "disk_span_sectors": 16 * 2048},
        32,
    ),
    Workload(
        "disk heavy",
        "20 MiB hot set rewritten as fast as TCG goes (3-17 MiB/s), 28 MiB disk",
        # tests/libvirt_harness/guest.py FAST_DISK_WRITER
        {"mem_kib": 256, "disk_sectors": 128, "paced": False, "disk_span_sectors": 20 * 2048, "disk_mib": 28},
        8,
    ),
)


# Beyond the four guest kinds bench/sim_fidelity.py records (it uses WORKLOADS): a guest whose remainder
# shrinks round after round, where the downtime ramp has something to wait for.
STREAM_WORKLOADS = (
    Workload(
        "memory stream",
        "32 MiB/s of memory dirtied through a 96 MiB span (each pass goes on where the last ended)",
        # A stream, not a hot set: what a round leaves shrinks with the round, as for most real guests.
        {"mem_kib": 1800, "mem_span_kib": 96 * 1024, "disk_sectors": 0, "paced": True},
        48,
    ),
)
# The 48 MiB guest as it was until 2026-12-05: the whole set rewritten in one ~1 ms burst per 55 ms tick.
# Whether a run ends after the first pass or rounds later turns on where QEMU's dirty syncs fall between the
# bursts (13 uncapped runs sent about 113, 161 or 255 MiB), so no prediction of one run can be near every run;
# bench/sim_fidelity.py records it beside the four kinds and reports it apart from the targets.
BURST_WORKLOADS = (
    Workload(
        "memory 48 MiB burst",
        "48 MiB of memory rewritten 18x/s in one burst per tick, cannot converge at the cap",
        {"mem_kib": 48 * 1024, "disk_sectors": 32, "paced": True},
        32,
    ),
)
ALL_WORKLOADS = WORKLOADS + STREAM_WORKLOADS + BURST_WORKLOADS


def _nothing(_p: Any) -> tuple[Any, ...]:
    return ()


@dataclass(frozen=True)
class PolicySpec:
    name: str
    auto_converge: str  # the driver's option: off | qemu | controlled
    policy: Callable[[Any], tuple[Any, ...]] | None  # None: the engine's controller
    max_throttle_pct: int | None = None  # with auto_converge=qemu: QEMU's cap
    # The engine's mirror and memory-stream choices (the driver's defaults: write-blocking disk mirror,
    # multifd); False: libvirt's own (background mirror, one connection), as a plain migrateToURI3 has.
    engine_transport: bool = False

    def transport_options(self) -> dict[str, str]:
        return {} if self.engine_transport else {"sync_writes": "0", "parallel_connections": "0"}


POLICIES = (
    PolicySpec("libvirt defaults", "off", _nothing),
    PolicySpec("auto-converge", "qemu", _nothing),
    PolicySpec("auto-converge + cap", "qemu", _nothing, max_throttle_pct=80),
    PolicySpec("ours", "controlled", None, engine_transport=True),
)


@dataclass
class RunResult:
    workload: str
    policy: str
    cap_mibps: int
    outcome: str  # completed | aborted: <reason> | not converged (timeout) | failed: <error>
    converged: bool
    downtime_ms: float | None
    duration_s: float
    bytes_transferred: int
    rounds: int
    throttle_max_pct: int
    throttle_pct_s: float
    throttle_series: list[tuple[float, int]]  # (s since start, QEMU's auto-converge %) at each change
    max_downtime_limit_ms: int | None  # the largest downtime limit QEMU held while the job ran
    disk_limit_s: float
    guest_runs_after: bool  # its counter advances where the droplet now is
    runs_on: str  # source | target
    source_untouched: bool | None  # for runs that did not complete: running, same definition, no job
    target_clean: bool  # no leftover domain or disk on the host that does not hold the droplet
    notes: list[str] = field(default_factory=list)


# --- one run ------------------------------------------------------------------------------------------------


def migrate_once(
    hosts: Any,
    conns: dict[str, Any],
    workload: Workload,
    cap_mibps: int,
    pol: PolicySpec,
    timeout_s: float,
    config: Any = None,
) -> RunResult:
    """Migrate a fresh guest of ``workload`` once under ``pol``; ``config``: the controller's
    ``ControllerConfig`` (default: the engine's defaults, as ``ours`` ships)."""
    import libvirt

    from host_engine.attempt import Outcome, RealClock, run_migration
    from host_engine.controller import ControllerConfig
    from host_engine.drivers.base import MigrationSpec
    from host_engine.drivers.libvirt import LibvirtMigration
    from tests.libvirt_harness.guest import GuestSpec

    src, dst = hosts.source, hosts.target
    guest = GuestSpec(**workload.guest)
    name = (
        "b-" + "".join(c for c in f"{workload.name}-{cap_mibps}-{pol.name}" if c.isalnum() or c == "-")[:40]
    )
    remove_everywhere(hosts, conns, name)
    sdom = start_guest(src, conns[src.name], name, guest)
    xml_before = sdom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    spec = MigrationSpec(
        migration_id=f"bench-{name}",
        droplet_id=name,
        source_host=src.name,
        target_host=dst.name,
        source_uri=src.uri,
        target_uri=dst.uri,
        vcpus=1,
        memory_bytes=guest.memory_mib * MiB,
        disk_bytes=guest.disk_mib * MiB,
        options={
            "peer_uri": dst.peer_uri,
            "bandwidth_mibps": str(cap_mibps),
            "auto_converge": pol.auto_converge,
            **({"auto_converge_max_pct": str(pol.max_throttle_pct)} if pol.max_throttle_pct else {}),
            **pol.transport_options(),
        },
    )

    started = time.monotonic()
    series: list[tuple[float, int]] = []
    samples: list[tuple[float, int]] = []
    limits: list[int] = []

    def watch(_p: Any) -> None:
        # QEMU's own throttle figure, whichever policy set it; jobStats is a query, allowed during the job.
        pct = 0
        with contextlib.suppress(libvirt.libvirtError):
            pct = int(sdom.jobStats().get("auto_converge_throttle", 0))
        with contextlib.suppress(libvirt.libvirtError):
            ms = sdom.migrateGetMaxDowntime(0)
            if ms is not None:
                limits.append(int(ms))
        t = time.monotonic() - started
        samples.append((t, pct))
        if not series or series[-1][1] != pct:
            series.append((round(t, 1), pct))

    def bench_timeout() -> str | None:
        if time.monotonic() - started >= timeout_s:
            return f"bench timeout {timeout_s:.0f} s"
        return None

    driver = LibvirtMigration(spec)
    try:
        result = run_migration(
            driver,
            config if config is not None else ControllerConfig(),
            RealClock(),
            tick_s=TICK_S,
            on_progress=watch,
            should_abort=bench_timeout,
            policy=pol.policy,
        )
    finally:
        driver.close()
    throttle_pct_s = sum(pct * (t1 - t0) for (t0, pct), (t1, _) in itertools.pairwise(samples))

    if result.outcome is Outcome.COMPLETED:
        outcome = "completed"
    elif result.outcome is Outcome.ABORTED and result.abort_reason is None:
        outcome = f"not converged (aborted at {timeout_s:.0f} s)"
    elif result.outcome is Outcome.ABORTED:
        outcome = f"gave up: {result.abort_reason.value if result.abort_reason else '?'}"
    else:
        outcome = f"failed: {result.reason}"

    notes: list[str] = []
    source_untouched: bool | None = None
    if result.converged:
        runs_on, there, other = "target", dst, src
    else:
        runs_on, there, other = "source", src, dst
    try:
        dom = conns[there.name].lookupByName(name)
        running = dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        runs = running and counter_advances(dom)
        if not result.converged:
            source_untouched = (
                runs
                and dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE) == xml_before
                and dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE
            )
    except libvirt.libvirtError as e:
        runs = False
        notes.append(f"{there.name}: {e}")
    left_dom, left_disk = holds(other, conns[other.name], name)
    if left_dom or left_disk:
        notes.append(
            f"{other.name} still holds {'the domain ' if left_dom else ''}{'the disk' if left_disk else ''}"
        )
    remove_everywhere(hosts, conns, name)
    return RunResult(
        workload=workload.name,
        policy=pol.name,
        cap_mibps=cap_mibps,
        outcome=outcome,
        converged=result.converged,
        downtime_ms=result.downtime_ms,
        duration_s=round(result.duration_s, 2),
        bytes_transferred=result.bytes_transferred,
        rounds=result.rounds,
        throttle_max_pct=max((p for _, p in samples), default=0),
        throttle_pct_s=round(throttle_pct_s, 1),
        throttle_series=series,
        max_downtime_limit_ms=max(limits, default=None),
        disk_limit_s=round(result.disk_limit_s, 1),
        guest_runs_after=runs,
        runs_on=runs_on,
        source_untouched=source_untouched,
        target_clean=not (left_dom or left_disk),
        notes=notes,
    )


# --- output -------------------------------------------------------------------------------------------------


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _throttle(r: RunResult) -> str:
    if r.throttle_max_pct == 0:
        return "0"
    steps = [f"{p} % @{t:.0f} s" for t, p in r.throttle_series if p]
    if len(steps) > 4:
        steps = [*steps[:2], "…", steps[-1]]
    return f"max {r.throttle_max_pct} %, {r.throttle_pct_s:,.0f} %·s ({', '.join(steps)})"


def _after(r: RunResult) -> str:
    where = f"runs on {r.runs_on}" if r.guest_runs_after else f"NOT running on {r.runs_on}"
    if r.source_untouched is not None:
        where += ", source untouched" if r.source_untouched else ", source CHANGED"
    where += "" if r.target_clean else ", leftover on the other host"
    return where


def markdown(results: list[RunResult]) -> str:
    lines = [
        "| workload (cap) | policy | outcome | downtime ms | total s | sent MiB | rounds "
        "| auto-converge throttle (QEMU) | disk limit s | guest after |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r.workload} ({_cap(r.cap_mibps)}) | {r.policy} | {r.outcome} | {_fmt(r.downtime_ms, '.0f')} "
            f"| {r.duration_s:.1f} | {r.bytes_transferred / MiB:,.0f} | {r.rounds} | {_throttle(r)} "
            f"| {r.disk_limit_s:.1f} | {_after(r)} |"
        )
    return "\n".join(lines)


def _cap(cap_mibps: int) -> str:
    return f"{cap_mibps} MiB/s" if cap_mibps else "uncapped"


def _median(values: list[float]) -> str:
    """Median [min-max] of the values, or '-'."""
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:,.0f}"
    return f"{med:,.0f} [{min(values):,.0f}-{max(values):,.0f}]"


def summary(results: list[RunResult]) -> str:
    """Per case (workload, cap, policy): how many runs converged, and medians [spread] of the rest."""
    lines = [
        "| workload | cap | policy | converged | downtime ms | total s | sent MiB | throttle %·s "
        "| disk limit s | QEMU's limit ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    cases: dict[tuple[str, int, str], list[RunResult]] = {}
    for r in results:
        cases.setdefault((r.workload, r.cap_mibps, r.policy), []).append(r)
    for (workload, cap, policy), runs in cases.items():
        ok = [r for r in runs if r.converged]
        lines.append(
            f"| {workload} | {_cap(cap)} | {policy} | {len(ok)}/{len(runs)} "
            f"| {_median([r.downtime_ms for r in ok if r.downtime_ms is not None])} "
            f"| {_median([r.duration_s for r in runs])} "
            f"| {_median([r.bytes_transferred / MiB for r in runs])} "
            f"| {_median([r.throttle_pct_s for r in runs])} "
            f"| {_median([r.disk_limit_s for r in runs])} "
            f"| {_median([r.max_downtime_limit_ms for r in runs if r.max_downtime_limit_ms is not None])} |"
        )
    return "\n".join(lines)


def loadavg() -> str:
    """/proc/loadavg's three load averages (1, 5, 15 min)."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def machine() -> str:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = ""
    with contextlib.suppress(Exception):
        import libvirt

        conn = libvirt.open("test:///default")
        lib = conn.getLibVersion()
        conn.close()
        versions = f"libvirt {lib // 1_000_000}.{lib // 1000 % 1000}.{lib % 1000}"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["qemu-system-x86_64", "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout.split()
        versions += f", QEMU {out[3]}" if len(out) > 3 else ""
    return (
        f"{os.cpu_count()} vCPUs ({cpu}), Linux {platform.release()}, Python {platform.python_version()}, "
        f"{versions}, TCG guests, load average {loadavg()} (1/5/15 min) at the start"
    )


# --- main ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help=f"per-migration bound in s (default {DEFAULT_TIMEOUT_S:.0f})",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"bound every migration at {QUICK_TIMEOUT_S:.0f} s instead (about half the wall time)",
    )
    parser.add_argument(
        "--workload",
        action="append",
        choices=[w.name for w in ALL_WORKLOADS],
        help="only this workload (repeatable; default: every workload but the burst writer's, which runs "
        "only when named)",
    )
    parser.add_argument("--reps", type=int, default=3, help="runs of every case (default 3)")
    parser.add_argument("--json", metavar="PATH", help="also write every run's numbers here")
    args = parser.parse_args(argv)

    missing = missing_prerequisites()
    if missing:
        print(f"libvirt_migration: skipped (needs {', '.join(missing)})")
        return 0
    timeout_s = args.timeout or (QUICK_TIMEOUT_S if args.quick else DEFAULT_TIMEOUT_S)
    default = WORKLOADS + STREAM_WORKLOADS
    workloads = [w for w in ALL_WORKLOADS if w.name in args.workload] if args.workload else list(default)

    about = machine()
    load_start = loadavg()
    started_at = datetime.now(UTC)
    t0 = time.monotonic()
    results: list[RunResult] = []
    # The warm-up (the first QEMU start on each host probes capabilities, seconds) is not in any run.
    with bench_harness("b-warmup") as harness:
        hosts, conns = harness.hosts, harness.conns
        print(f"# {about}; harness up in {time.monotonic() - t0:.1f} s", flush=True)
        cases = [(w, cap) for w in workloads for cap in (0, w.cap_mibps)]
        for rep in range(args.reps):
            for (workload, cap), pol in itertools.product(cases, POLICIES):
                r = migrate_once(hosts, conns, workload, cap, pol, timeout_s)
                results.append(r)
                print(
                    f"{rep + 1}: {workload.name:>14} {_cap(cap):>9} | {pol.name:<19} | {r.outcome}, "
                    f"downtime "
                    f"{_fmt(r.downtime_ms, '.0f')} ms, {r.duration_s:.1f} s, "
                    f"{r.bytes_transferred / MiB:,.0f} MiB, {r.rounds} rounds, {_throttle(r)}, "
                    f"disk limit {r.disk_limit_s:.1f} s; {_after(r)} {'; '.join(r.notes)}",
                    flush=True,
                )
    teardown = harness.torn_down()
    wall_s = time.monotonic() - t0
    print()
    print(
        f"# {started_at:%Y-%m-%d %H:%M} UTC, {wall_s:.0f} s wall, per-migration bound {timeout_s:.0f} s; "
        f"load average {loadavg()} (1/5/15 min) at the end; "
        f"teardown: {teardown.describe()} ({len(teardown.pids)} processes stopped)"
    )
    print(summary(results))
    print()
    print(markdown(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps(
                {
                    "started_at": started_at.isoformat(timespec="seconds"),
                    "machine": about,
                    "wall_s": round(wall_s, 1),
                    "loadavg_start": load_start,
                    "loadavg_end": loadavg(),
                    "timeout_s": timeout_s,
                    "reps": args.reps,
                    "teardown_clean": teardown.clean,
                    "runs": [asdict(r) for r in results],
                },
                indent=2,
            )
            + "\n"
        )
    return 0 if teardown.clean else 1


if __name__ == "__main__":
    raise SystemExit(main())
