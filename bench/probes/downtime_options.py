"""Probe: do QEMU's multifd or libvirt's write-blocking disk mirror shorten a hot-set guest's downtime?

A one-off experiment on the two-host libvirt harness (``tests/libvirt_harness``), not a benchmark the
engine's figures come from. For each guest of ``bench/libvirt_migration.py`` asked for, a fresh guest on
hostA is migrated to hostB by a plain ``migrateToURI3`` with the engine's flags (LIVE | PEER2PEER |
NON_SHARED_DISK | PERSIST_DEST | UNDEFINE_SOURCE, its disks created on the target first, as the driver
does) and a fixed downtime limit, under each option:

- ``plain``: the engine's flags only;
- ``multifd N``: plus ``VIR_MIGRATE_PARALLEL`` with ``VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS`` = N (QEMU
  sends RAM pages over N extra connections, each with its own sender thread);
- ``sync writes``: plus ``VIR_MIGRATE_NON_SHARED_SYNCHRONOUS_WRITES`` (the disk mirror in write-blocking
  mode: a guest write completes only once copied to the target; only on guests that write their disk).

The options are interleaved: every repetition runs every (guest, cap) case under every option, in an order
rotated by one each repetition, so the shared machine's load hits all alike. Nothing polls the job while it
runs (a poll landing in the pause would wait for QEMU through it). Recorded per run: libvirt's completed job
statistics read on the target (``downtime``, ``time_elapsed``, memory bytes and rounds; they leave the NBD
mirror's bytes out), the call's wall time, and ``/proc/loadavg`` before and after. ``--check`` first
migrates one guest (a capped one where asked for) once per option with the source daemon's QEMU-monitor
debug log on (``virt-admin daemon-log-filters``) and QEMU's ``query-migrate`` sampled every 0.1 s, and
reports whether QEMU was handed multifd / write-blocking and used it (those runs are not in the results).

    sudo flock /work/coord/harness.lock .venv/bin/python bench/probes/downtime_options.py --check \\
        --reps 6 --options "plain,multifd 2,multifd 4,sync writes" --json /tmp/downtime_options.json

The downtime limit is 50 ms, except where the guest's hot set cannot fit the limit at the bandwidth cap
(the 8 MiB hot set at 32 MiB/s: 1.6 MiB fits 50 ms): there 300 ms (libvirt's and QEMU's default), else
QEMU would never switch over. QEMU sends the final pass at line rate either way.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))

from bench import libvirt_migration as lm  # noqa: E402

MiB = 1024 * 1024
DOWNTIME_LIMIT_MS = 50
TIMEOUT_S = 40.0
CHECK_SAMPLE_S = 0.1


@dataclass(frozen=True)
class Option:
    name: str
    parallel: int = 0  # multifd connections (0: off)
    sync_writes: bool = False
    disk_only: bool = False  # only on guests that write their disk


OPTIONS = {
    o.name: o
    for o in (
        Option("plain"),
        Option("multifd 2", parallel=2),
        Option("multifd 4", parallel=4),
        Option("sync writes", sync_writes=True, disk_only=True),
    )
}

# (workload name, cap MiB/s or 0): the hot-set guests of bench/libvirt_migration.py.
DEFAULT_CASES = (
    ("memory 8 MiB", 0),
    ("memory 8 MiB", 32),
    ("memory + disk", 0),
    ("memory + disk", 32),
    ("disk heavy", 0),
)


@dataclass
class Run:
    workload: str
    cap_mibps: int
    option: str
    rep: int
    downtime_limit_ms: int
    ok: bool
    error: str
    downtime_ms: int | None
    elapsed_ms: int | None  # libvirt's time_elapsed
    call_s: float  # migrateToURI3's wall time
    memory_mib: float  # libvirt's memory_processed (its completed stats leave the NBD mirror's bytes out)
    rounds: int  # memory_iteration
    load_before: str
    load_after: str
    runs_on_target: bool
    guest_write_mibps: float | None  # the guest's own disk writes over the call (its sector counter)
    stats: dict[str, Any] = field(default_factory=dict)


def loadavg1() -> str:
    return lm.loadavg().split()[0]


def workload(name: str) -> Any:
    for w in lm.ALL_WORKLOADS:
        if w.name == name:
            return w
    raise SystemExit(f"downtime_options: no workload {name!r} in bench/libvirt_migration.py")


def writes_disk(w: Any) -> bool:
    return int(w.guest.get("disk_sectors", 0)) > 0


def limit_for(w: Any, cap_mibps: int) -> int:
    """50 ms, or 300 where the hot set cannot fit 50 ms at the cap (QEMU would never switch over)."""
    hot_mib = int(w.guest.get("mem_kib", 0)) / 1024
    if cap_mibps and hot_mib > cap_mibps * DOWNTIME_LIMIT_MS / 1000:
        return 300
    return DOWNTIME_LIMIT_MS


def flags_and_params(
    lv: Any, opt: Option, disks: list[Any], name: str, cap: int
) -> tuple[int, dict[str, Any]]:
    """The engine driver's flags and parameters (host_engine/drivers/libvirt/migration.py), plus ``opt``."""
    params: dict[str, Any] = {
        lv.VIR_MIGRATE_PARAM_MIGRATE_DISKS: [d.target for d in disks],
        lv.VIR_MIGRATE_PARAM_DEST_NAME: name,
    }
    if cap:
        params[lv.VIR_MIGRATE_PARAM_BANDWIDTH] = cap
    flags = (
        lv.VIR_MIGRATE_LIVE
        | lv.VIR_MIGRATE_PEER2PEER
        | lv.VIR_MIGRATE_NON_SHARED_DISK
        | lv.VIR_MIGRATE_PERSIST_DEST
        | lv.VIR_MIGRATE_UNDEFINE_SOURCE
    )
    if opt.parallel:
        flags |= lv.VIR_MIGRATE_PARALLEL
        params[lv.VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS] = opt.parallel
    if opt.sync_writes:
        flags |= lv.VIR_MIGRATE_NON_SHARED_SYNCHRONOUS_WRITES
    return flags, params


class Sampler:
    """``--check`` only: QEMU's migration capabilities, parameters and ``query-migrate`` every 0.1 s."""

    def __init__(self, dom: Any) -> None:
        self.dom = dom
        self.stop = threading.Event()
        self.capabilities: dict[str, bool] = {}
        self.parameters: dict[str, Any] = {}
        self.last_ram: dict[str, Any] = {}
        self.statuses: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from host_engine.drivers.base import DriverError
        from host_engine.drivers.libvirt.qmp import qmp

        while not self.stop.wait(CHECK_SAMPLE_S):
            try:
                info = qmp(self.dom, "query-migrate", {})
                status = str(info.get("status", "none"))
                if not self.statuses or self.statuses[-1] != status:
                    self.statuses.append(status)
                if status == "active":
                    self.last_ram = dict(info.get("ram", {}))
                    if not self.capabilities:
                        caps = qmp(self.dom, "query-migrate-capabilities", {})["return"]
                        self.capabilities = {c["capability"]: c["state"] for c in caps}
                        self.parameters = qmp(self.dom, "query-migrate-parameters", {})
            except DriverError:
                continue  # the domain left the source: the run is over

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


def migrate_once(
    hosts: Any,
    conns: dict[str, Any],
    wname: str,
    cap: int,
    opt: Option,
    rep: int,
    *,
    check: bool = False,
    timeout_s: float = TIMEOUT_S,
) -> tuple[Run, dict[str, Any]]:
    import libvirt

    from host_engine.drivers.libvirt.disks import read_disks
    from host_engine.drivers.libvirt.storage import create_volume, delete_volume
    from tests.libvirt_harness.guest import SECTOR_BYTES, GuestSpec, read_counters
    from tests.libvirt_harness.support import monitor_log

    w = workload(wname)
    src, dst = hosts.source, hosts.target
    name = "p-" + "".join(c for c in f"{wname}-{cap}-{opt.name}" if c.isalnum() or c == "-")[:40]
    lm.remove_everywhere(hosts, conns, name)
    sdom = lm.start_guest(src, conns[src.name], name, GuestSpec(**w.guest))
    disks = read_disks(sdom, sized=True)
    for disk in disks:
        delete_volume(conns[dst.name], disk.path)  # refreshes the pool (remove_everywhere unlinks files)
        create_volume(conns[dst.name], disk, dst.name)
    limit = limit_for(w, cap)
    sdom.migrateSetMaxDowntime(limit, 0)
    flags, params = flags_and_params(libvirt, opt, disks, name, cap)

    # Every run is bounded: abort a job still running after timeout_s.
    done = threading.Event()

    def bound() -> None:
        if not done.wait(timeout_s):
            with contextlib.suppress(libvirt.libvirtError):
                sdom.abortJob()

    watchdog = threading.Thread(target=bound, daemon=True)
    watchdog.start()
    evidence: dict[str, Any] = {}
    logs = contextlib.ExitStack()
    log_file = logs.enter_context(monitor_log(src, "probe-qmp.log")) if check else None
    sectors_before = read_counters(sdom).sectors_written
    load_before = loadavg1()
    error = ""
    t0 = time.monotonic()
    sampler = Sampler(sdom) if check else None
    try:
        with sampler if sampler is not None else contextlib.nullcontext():
            sdom.migrateToURI3(dst.peer_uri, params, flags)
    except libvirt.libvirtError as e:
        error = str(e)
    call_s = time.monotonic() - t0
    done.set()
    load_after = loadavg1()
    logs.close()
    if log_file is not None:
        text = log_file.read_text(errors="replace") if log_file.exists() else ""
        evidence = {
            "multifd capability sent": '"capability":"multifd","state":true' in text,
            "multifd-channels sent": sorted({int(n) for n in re.findall(r'"multifd-channels":(\d+)', text)}),
            "write-blocking sent": '"copy-mode":"write-blocking"' in text,
            "debug log lines": text.count("\n"),
        }
        if sampler is not None:
            evidence |= {
                "query-migrate statuses": sampler.statuses,
                "capability multifd": sampler.capabilities.get("multifd"),
                "multifd-channels": sampler.parameters.get("multifd-channels"),
                "last ram multifd-bytes": sampler.last_ram.get("multifd-bytes"),
                "last ram transferred": sampler.last_ram.get("transferred"),
            }

    stats: dict[str, Any] = {}
    runs_on_target = False
    write_mibps: float | None = None
    with contextlib.suppress(libvirt.libvirtError, RuntimeError):
        # The guest's own counter: on the target after a migration, still on the source after a failed one.
        now = read_counters(sdom if error else conns[dst.name].lookupByName(name)).sectors_written
        write_mibps = round((now - sectors_before) % 2**32 * SECTOR_BYTES / MiB / call_s, 2)
    with contextlib.suppress(libvirt.libvirtError):
        tdom = conns[dst.name].lookupByName(name)
        stats = dict(tdom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED))
        runs_on_target = tdom.state()[0] == libvirt.VIR_DOMAIN_RUNNING and lm.counter_advances(
            tdom, passes=2, wait_s=5
        )
    lm.remove_everywhere(hosts, conns, name)
    ok = not error and "downtime" in stats
    run = Run(
        workload=wname,
        cap_mibps=cap,
        option=opt.name,
        rep=rep,
        downtime_limit_ms=limit,
        ok=ok,
        error=error or ("" if ok else "no completed stats on the target"),
        downtime_ms=int(stats["downtime"]) if "downtime" in stats else None,
        elapsed_ms=int(stats["time_elapsed"]) if "time_elapsed" in stats else None,
        call_s=round(call_s, 2),
        memory_mib=round(int(stats.get("memory_processed", 0)) / MiB, 1),
        rounds=int(stats.get("memory_iteration", 0)),
        load_before=load_before,
        load_after=load_after,
        runs_on_target=runs_on_target,
        guest_write_mibps=write_mibps,
        stats={k: v for k, v in stats.items() if isinstance(v, int | float)},
    )
    return run, evidence


def spread(values: list[float], fmt: str = ",.0f") -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    return f"{med:{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"


def summary(runs: list[Run]) -> str:
    lines = [
        "| guest | cap | option | ok | downtime ms | libvirt elapsed s | call s | memory sent MiB | rounds "
        "| guest writes MiB/s | load 1 min |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    cases: dict[tuple[str, int, str], list[Run]] = {}
    for r in runs:
        cases.setdefault((r.workload, r.cap_mibps, r.option), []).append(r)
    for (wname, cap, opt), rs in cases.items():
        ok = [r for r in rs if r.ok]
        loads = [float(r.load_before) for r in rs] + [float(r.load_after) for r in rs]
        lines.append(
            f"| {wname} | {f'{cap} MiB/s' if cap else 'uncapped'} | {opt} | {len(ok)}/{len(rs)} "
            f"| {spread([float(r.downtime_ms) for r in ok if r.downtime_ms is not None])} "
            f"| {spread([r.elapsed_ms / 1000 for r in ok if r.elapsed_ms is not None], '.1f')} "
            f"| {spread([r.call_s for r in ok], '.1f')} "
            f"| {spread([r.memory_mib for r in ok], ',.1f')} | {spread([float(r.rounds) for r in ok])} "
            f"| {spread([r.guest_write_mibps for r in rs if r.guest_write_mibps is not None], '.1f')} "
            f"| {min(loads):.2f}-{max(loads):.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument(
        "--options", default="plain,multifd 2", help=f"comma-separated, of: {', '.join(OPTIONS)}"
    )
    parser.add_argument(
        "--case",
        action="append",
        metavar="WORKLOAD:CAP",
        help="e.g. 'memory 8 MiB:32' (repeatable; default: the five hot-set cases)",
    )
    parser.add_argument("--check", action="store_true", help="first check each option engaged (not counted)")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="abort a migration after S s")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    options = [OPTIONS[o.strip()] for o in args.options.split(",")]
    cases = (
        [(c.rsplit(":", 1)[0], int(c.rsplit(":", 1)[1])) for c in args.case] if args.case else DEFAULT_CASES
    )
    for wname, _cap in cases:
        workload(wname)
    missing = lm.missing_prerequisites()
    if missing:
        print(f"downtime_options: skipped (needs {', '.join(missing)})")
        return 0

    import libvirt

    from host_engine.drivers.libvirt.events import EventLoop
    from tests.libvirt_harness.guest import GuestSpec
    from tests.libvirt_harness.hosts import TwoHosts

    started_at = datetime.now(UTC)
    load_start = lm.loadavg()
    t0 = time.monotonic()
    EventLoop.ensure()
    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    runs: list[Run] = []
    checks: dict[str, Any] = {}
    with TwoHosts() as hosts:
        conns = {h.name: libvirt.open(h.uri) for h in hosts.hosts}
        try:
            warm = GuestSpec(mem_kib=0, disk_sectors=0, paced=True, disk_mib=8)
            for host in hosts.hosts:
                lm.start_guest(host, conns[host.name], "p-warmup", warm)
                lm.remove_everywhere(hosts, conns, "p-warmup")
            print(f"# {lm.machine()}; harness up in {time.monotonic() - t0:.1f} s", flush=True)
            if args.check:
                for opt in options:
                    # A capped case where there is one (its memory phase lasts long enough to sample).
                    fits = [c for c in cases if not opt.disk_only or writes_disk(workload(c[0]))] or cases
                    wname, cap = max(fits, key=lambda c: c[1])
                    run, evidence = migrate_once(hosts, conns, wname, cap, opt, -1, check=True)
                    checks[opt.name] = {"case": f"{wname} {cap}", "downtime_ms": run.downtime_ms, **evidence}
                    print(f"# check {opt.name} on {wname} {cap}: {run.error or 'ok'}; {evidence}", flush=True)
            for rep in range(args.reps):
                order = options[rep % len(options) :] + options[: rep % len(options)]
                for wname, cap in cases:
                    for opt in order:
                        if opt.disk_only and not writes_disk(workload(wname)):
                            continue
                        run, _ = migrate_once(hosts, conns, wname, cap, opt, rep, timeout_s=args.timeout)
                        runs.append(run)
                        print(
                            f"{rep + 1}: {wname:>13} {cap:>2} | {opt.name:<11} | "
                            f"{run.error[:80] if not run.ok else 'ok'} downtime {run.downtime_ms} ms "
                            f"(limit {run.downtime_limit_ms}), elapsed {run.elapsed_ms} ms, "
                            f"call {run.call_s} s, memory {run.memory_mib} MiB in {run.rounds} rounds, "
                            f"guest writes {run.guest_write_mibps} MiB/s, "
                            f"load {run.load_before}->{run.load_after}"
                            f"{'' if run.runs_on_target else ', NOT running on the target'}",
                            flush=True,
                        )
        finally:
            for conn in conns.values():
                with contextlib.suppress(libvirt.libvirtError):
                    conn.close()
    wall_s = time.monotonic() - t0
    print()
    print(
        f"# {started_at:%Y-%m-%d %H:%M} UTC, {wall_s:.0f} s wall; load average {load_start} at the start, "
        f"{lm.loadavg()} at the end"
    )
    print(summary(runs))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "started_at": started_at.isoformat(timespec="seconds"),
                    "wall_s": round(wall_s, 1),
                    "loadavg_start": load_start,
                    "loadavg_end": lm.loadavg(),
                    "checks": checks,
                    "runs": [asdict(r) for r in runs],
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
