"""Four migration policies side by side on the simulated hypervisor, same workloads, same seeds.

- stop-and-copy: pause at once, copy everything, resume on the target.
- Xen pre-copy: rounds with no throttle; stop after 29 rounds or once 3x the data was sent (or nothing is
  left), then stop-and-copy whatever remains, however long that pause is.
- QEMU defaults: auto-converge (throttle 20 % once the guest dirtied more than 50 % of what was sent in two
  syncs, then +10 % per further such sync, up to 99 %), switchover once the remainder fits 300 ms.
- ours: ``host_engine.controller`` with its defaults.

Same droplet and link as bench/convergence.py. Every run is stopped at 600 s of simulated time ("not
converged") so a policy that never converges does not run for ever; ours also stops by its own rules.
"converged" = completed with downtime within the 300 ms budget.

    .venv/bin/python bench/migration_policies.py [--seeds 3] [--json]
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

from host_engine.attempt import MigrationResult, Policy, run_migration
from host_engine.controller import (
    Abort,
    AbortReason,
    Action,
    ControllerConfig,
    GiB,
    SetMemoryThrottle,
    Switchover,
    fits_downtime,
)
from host_engine.drivers.base import MigrationSpec, Phase, Progress
from host_engine.drivers.sim import WORKLOADS, SimClock, SimHypervisor, SimWorld, Workload

MEMORY_BYTES = 8 * GiB
DISK_BYTES = 80 * GiB
BUDGET_MS = 300
CUTOFF_S = 600.0
CONFIG = ControllerConfig()


def _cutoff(p: Progress) -> tuple[Action, ...] | None:
    if p.elapsed_s >= CUTOFF_S and p.phase in (Phase.DISK, Phase.MEMORY):
        return (Abort(AbortReason.TIMEOUT, f"bench cut-off {CUTOFF_S:.0f} s"),)
    return None


class StopAndCopy:
    def __call__(self, p: Progress) -> tuple[Action, ...]:
        return (Switchover(),) if p.phase in (Phase.DISK, Phase.MEMORY) else ()


class XenPrecopy:
    """Xen's xc_domain_save stop rules: at most 29 rounds or 3x the data sent, or (almost) nothing left."""

    MAX_ROUNDS = 29
    MAX_FACTOR = 3

    def __call__(self, p: Progress) -> tuple[Action, ...]:
        if p.phase not in (Phase.DISK, Phase.MEMORY):
            return ()
        total = p.disk_total_bytes + p.memory_total_bytes
        left = p.disk_remaining_bytes + p.memory_remaining_bytes
        done_rounds = p.phase is Phase.MEMORY and p.round >= self.MAX_ROUNDS
        if (
            done_rounds
            or p.bytes_transferred >= self.MAX_FACTOR * total
            or (p.phase is Phase.MEMORY and left == 0)
        ):
            return (Switchover(),)
        return _cutoff(p) or ()


class QemuDefaults:
    """QEMU 7.2 with auto-converge on and libvirt's defaults: 300 ms downtime limit, no disk throttle."""

    INITIAL_PCT = 20
    INCREMENT_PCT = 10
    MAX_PCT = 99
    TRIGGER_RATIO = 0.5

    def __init__(self) -> None:
        self.last_round = 0
        self.high_count = 0

    def __call__(self, p: Progress) -> tuple[Action, ...]:
        if p.phase not in (Phase.DISK, Phase.MEMORY):
            return ()
        if fits_downtime(p, ControllerConfig(max_downtime_ms=BUDGET_MS, switchover_safety=1.0)):
            return (Switchover(),)
        actions: list[Action] = []
        if p.phase is Phase.MEMORY and p.round > self.last_round:
            # One dirty-bitmap sync per round: compare what the guest dirtied with what was sent.
            self.last_round = p.round
            if p.round >= 2 and p.memory_dirty_rate_bps > self.TRIGGER_RATIO * p.transfer_rate_bps:
                self.high_count += 1
                if self.high_count >= 2:
                    self.high_count = 0
                    pct = (
                        self.INITIAL_PCT
                        if p.memory_throttle_pct == 0
                        else p.memory_throttle_pct + self.INCREMENT_PCT
                    )
                    actions.append(SetMemoryThrottle(min(self.MAX_PCT, pct)))
        return tuple(actions) + (_cutoff(p) or ())


POLICIES: dict[str, Callable[[], Policy | None]] = {
    "stop-and-copy": StopAndCopy,
    "xen pre-copy": XenPrecopy,
    "qemu defaults": QemuDefaults,
    "ours": lambda: None,
}


@dataclass
class Cell:
    results: list[MigrationResult]

    def summary(self) -> dict[str, object]:
        rs = self.results
        total = DISK_BYTES + MEMORY_BYTES
        completed = [r for r in rs if r.converged]
        converged = [r for r in completed if r.downtime_ms is not None and r.downtime_ms <= BUDGET_MS]
        downs = [r.downtime_ms for r in completed if r.downtime_ms is not None]
        return {
            "converged": f"{len(converged)}/{len(rs)}",
            "completed": f"{len(completed)}/{len(rs)}",
            "downtime_ms": statistics.median(downs) if downs else None,
            "duration_s": statistics.median(r.duration_s for r in rs),
            "bytes_ratio": statistics.median(r.bytes_transferred / total for r in rs),
            "throttle_pct_s": statistics.median(r.throttle_pct_s for r in rs),
            "disk_limit_s": statistics.median(r.disk_limit_s for r in rs),
        }


def migrate(workload: Workload, seed: int, policy: Policy | None) -> MigrationResult:
    world = SimWorld(seed)
    world.add_host("src")
    world.add_host("dst")
    world.add_droplet(
        "d", "src", memory_bytes=MEMORY_BYTES, disk_bytes=DISK_BYTES, vcpus=4, workload=workload
    )
    spec = MigrationSpec("m", "d", "src", "dst", "sim://src", "sim://dst", 4, MEMORY_BYTES, DISK_BYTES)
    driver = SimHypervisor(world).migration(spec)
    result = run_migration(driver, CONFIG, SimClock(world), policy=policy)
    if result.converged and driver.verified is not True:
        raise AssertionError(f"{workload.name} seed {seed}: target differs from source at switchover")
    return result


def _fmt(v: object, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    table: dict[str, dict[str, dict[str, object]]] = {}
    for wname, factory in WORKLOADS.items():
        table[wname] = {}
        for pname, make_policy in POLICIES.items():
            cell = Cell([migrate(factory(), seed, make_policy()) for seed in range(args.seeds)])
            table[wname][pname] = cell.summary()
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    print(
        f"# {platform.python_implementation()} {platform.python_version()}, {args.seeds} seeds, "
        f"{time.perf_counter() - started:.1f} s wall"
    )
    print(
        "| workload | policy | converged (≤300 ms) | completed | downtime ms | total s | bytes ÷ (disk+mem) "
        "| throttle %·s | disk limit s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for wname, row in table.items():
        for pname, s in row.items():
            print(
                f"| {wname} | {pname} | {s['converged']} | {s['completed']} "
                f"| {_fmt(s['downtime_ms'], ',.0f')} "
                f"| {_fmt(s['duration_s'], '.1f')} | {_fmt(s['bytes_ratio'], '.2f')} "
                f"| {_fmt(s['throttle_pct_s'], '.0f')} | {_fmt(s['disk_limit_s'], '.1f')} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
