"""Calibrating the simulator from real migrations (issue 14).

``calibrate``: a host model (link throughput, fixed costs, switchover cost) and per-droplet workloads (dirty
rates, hot sets, resident memory, allocated disk) fitted from the progress samples the engine records for real
migrations (``RecordedRun``), so a fleet's sim learns from that fleet. Each candidate is scored by predicting
the recorded run with ``host_engine.prediction.predict_migration``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from host_engine.drivers.sim.model import DEFAULT_STEP_S, HostModel
from host_engine.drivers.sim.workloads import DEFAULT_NIC_BPS, Pattern, Workload
from host_engine.prediction import DEFAULT_TICK_S, Link, predict_migration

# In the calibration's loss, a downtime this far off weighs as much as a total time off by a factor e: real
# downtimes of the same guest differ by up to ~100 ms on the harness, so it must not drown bytes and time.
DOWNTIME_LOSS_SCALE_MS = 200.0
# How many of the best workloads (by bytes and time) the calibration tries again with the downtime.
REFIT_CANDIDATES = 6
# How often a guest that writes its hot set in bursts may burst, tried for the hot set its rounds showed
# (4 to 16 a second; much faster, a burst falls within nearly every QEMU sync interval: as good as writing
# all the time, which the swept candidates are).
PERIODIC_PASSES_PER_S = (4.0, 8.0, 16.0)


@dataclass(frozen=True)
class RecordedRun:
    """A real migration as the engine recorded it: its numbers and every progress sample (plain dicts with
    ``Progress``'s field names, ``phase`` as its value and ``t`` in seconds since the start)."""

    droplet_id: str
    memory_bytes: int
    disk_bytes: int
    cap_mibps: int
    converged: bool
    duration_s: float
    downtime_ms: float | None
    bytes_transferred: int
    samples: tuple[Mapping[str, Any], ...]


@dataclass(frozen=True)
class Calibration:
    link_bps: float
    host: HostModel
    workloads: dict[str, Workload]

    def link(self) -> Link:
        return Link(self.link_bps, self.host, self.host)

    def to_dict(self) -> dict[str, Any]:
        return {
            "link_bps": round(self.link_bps),
            "mirror_bps": None if self.host.mirror_bps is None else round(self.host.mirror_bps),
            "setup_s": round(self.host.setup_s, 3),
            "switchover_ms": round(self.host.switchover_ms, 1),
            "sync_disk_writes": self.host.sync_disk_writes,
            "workloads": {k: w.to_dict() for k, w in sorted(self.workloads.items())},
        }


def _values(samples: Iterable[Mapping[str, Any]], key: str) -> list[float]:
    return [float(s[key]) for s in samples if s.get(key) is not None]


def _sample_rates(r: RecordedRun) -> list[float]:
    out = []
    for a, b in zip(r.samples, r.samples[1:], strict=False):
        dt = float(b.get("t", 0)) - float(a.get("t", 0))
        moved = sum(float(b.get(k, 0) or 0) - float(a.get(k, 0) or 0) for k in _PROCESSED)
        if dt > 0.05 and moved > 0:
            out.append(moved / dt)
    return out


_PROCESSED = ("disk_processed_bytes", "memory_processed_bytes")


def _completed_rate(r: RecordedRun) -> float:
    """What the completed job's last sample says the memory copy moved per second: the libvirt driver reports
    QEMU's own measure there (its bytes over its transfer time), where samples a tick apart see only a
    floor when the copy is over within a tick (0: no such sample)."""
    last = r.samples[-1] if r.samples else {}
    if last.get("phase") != "done" or not float(last.get("memory_processed_bytes", 0) or 0):
        return 0.0
    rate = float(last.get("transfer_rate_bps", 0) or 0)
    return rate if math.isfinite(rate) and rate > 0 else 0.0


def _mirror_rates(r: RecordedRun) -> list[float]:
    """How fast the disk mirror's bytes grew between two samples before memory began."""
    out = []
    for a, b in zip(r.samples, r.samples[1:], strict=False):
        if b.get("phase") not in ("preparing", "disk") and a.get("phase") not in ("preparing", "disk"):
            continue
        dt = float(b.get("t", 0)) - float(a.get("t", 0))
        moved = float(b.get("disk_processed_bytes", 0) or 0) - float(a.get("disk_processed_bytes", 0) or 0)
        if dt > 0.05 and moved > 0:
            out.append(moved / dt)
    return out


def link_and_mirror(runs: Sequence[RecordedRun]) -> tuple[float, float | None]:
    """The link and the disk mirror's own speed (None: no slower than the link) from the uncapped runs.

    The link: the fastest the runs' bytes grew between two samples, or QEMU's measure of a completed memory
    copy when higher. Between samples is only a floor when the copy is over within a tick (the harness's
    128 MiB guests: 250-290 MB/s seen against QEMU's 1.2-1.3 GB/s); libvirt's own rate is an average that
    includes the setup. The mirror (one NBD connection) is slower than memory (multifd) there: when QEMU's
    measure raises the link, the mirror keeps the fastest growth of its own bytes that the samples saw."""
    uncapped = [r for r in runs if not r.cap_mibps] or list(runs)
    sampled = max((rate for r in uncapped for rate in _sample_rates(r)), default=0.0)
    measured = max((_completed_rate(r) for r in uncapped if not r.cap_mibps), default=0.0)
    link_bps = max(sampled, measured)
    if not math.isfinite(link_bps) or link_bps <= 0:
        return DEFAULT_NIC_BPS, None
    mirror = max((rate for r in uncapped for rate in _mirror_rates(r)), default=0.0)
    if measured <= sampled or not 0 < mirror < link_bps:
        return link_bps, None
    return link_bps, mirror


def _final(r: RecordedRun, key: str) -> float:
    return float(r.samples[-1].get(key, 0) or 0) if r.samples else 0.0


def _rounds(r: RecordedRun) -> int:
    return max((int(s.get("round", 0) or 0) for s in r.samples), default=0)


def _seen_hot(runs: Sequence[RecordedRun]) -> float:
    """The hot set the rounds after the first showed: the most memory left at a round's start, in the run
    that showed least (a capped run's first samples of round 2 can still carry round 1's remainder, stale;
    an uncapped run shows the rewritten set). 0 when no run got past round 1."""
    seen = [
        max(_values([s for s in r.samples if int(s.get("round", 0) or 0) >= 2], "memory_remaining_bytes"))
        for r in runs
        if any(int(s.get("round", 0) or 0) >= 2 and s.get("memory_remaining_bytes") for s in r.samples)
    ]
    return min(seen, default=0.0)


_COPYING = ("disk", "memory")


def _mirror_span_s(r: RecordedRun) -> float:
    """How long the mirror ran in ``r``, from its first byte (midway between the last sample before it and
    the first after) to the last sample before the pause."""
    ts = [
        (float(s.get("t", 0)), float(s.get("disk_processed_bytes", 0) or 0))
        for s in r.samples
        if s.get("phase") in ("preparing", *_COPYING)
    ]
    copying = [t for t, done in ts if done > 0]
    if not copying:
        return 0.0
    before = [t for t, done in ts if done <= 0 and t < copying[0]]
    start = (before[-1] + copying[0]) / 2.0 if before else copying[0]
    return max(0.0, copying[-1] - start)


def _sync_disk(runs: Sequence[RecordedRun], disk: int, reported_rate: float) -> tuple[int, float]:
    """The allocated disk and the guest's disk write rate from runs under a write-blocking mirror.

    The mirror's bytes count the guest's writes, which cross the link as they happen, on top of one pass
    over the allocated disk. QEMU's mirror length (``disk_total_bytes``) starts at what the pass must copy
    and grows with each write, so its smallest value is the allocated disk (the driver reports the disk's
    size until QEMU reports one, never less); what the mirror sent beyond it is the guest's writes, over the
    mirror's life. A dirty rate the driver reported (drivers before ``da9e56f`` reported the guest's writes
    there) is used as it is. The allocated disk: the median over the runs; the rate: all the runs' writes
    over all their mirrors' time, so a mirror over within a tick (uncapped, 0.13 s: 0.2-0.4 MiB/s read
    from a guest writing 17) weighs by its length, not as one of four values whose median halved the rate."""
    allocated: list[float] = []
    written = 0.0
    spans = 0.0
    for r in runs:
        totals = [
            float(s["disk_total_bytes"])
            for s in r.samples
            if s.get("phase") in _COPYING and float(s.get("disk_total_bytes", 0) or 0) > 0
        ]
        sent = _final(r, "disk_processed_bytes")
        span = _mirror_span_s(r)
        if reported_rate > 0:
            allocated.append(sent - reported_rate * span)
            continue
        first = min(totals, default=float(disk))
        allocated.append(first)
        if span > 0:
            written += max(0.0, sent - first)
            spans += span
    copied = int(min(disk, max(64 * 1024, statistics.median(allocated))))
    rate = reported_rate if reported_rate > 0 else (written / spans if spans > 0 else 0.0)
    return copied, rate


def _candidates(name: str, runs: Sequence[RecordedRun], *, sync_disk_writes: bool = True) -> list[Workload]:
    """Workloads consistent with a droplet's samples, one per hot-set size tried.

    What the samples pin down: the allocated disk (the mirror's bytes of the run that rewrote least) and the
    disk write rate (libvirt's dirty rate of the mirror), or under a write-blocking mirror
    (``sync_disk_writes``), whose bytes also count the guest's own writes, both from ``_sync_disk``; the hot
    memory (what was left after round 1, when seen). What they leave open (QEMU reports no dirty rate for a
    guest paced below its sync period) is tried: hot sets from 256 KiB to the RAM, each swept every step (the
    harness's guests rewrite theirs 18x/s), with the resident memory that the run's bytes then imply; and
    the hot set the rounds showed written in bursts (``Pattern.PERIODIC``, ``PERIODIC_PASSES_PER_S``).
    """
    samples = [s for r in runs for s in r.samples]
    disk_rates = [v for v in _values(samples, "disk_dirty_rate_bps") if v > 0]
    disk_rate = statistics.median(disk_rates) if disk_rates else 0.0
    memory = max(r.memory_bytes for r in runs)
    disk = max(r.disk_bytes for r in runs)
    if sync_disk_writes:
        allocated, disk_rate = _sync_disk(runs, disk, disk_rate)
    else:
        allocated = int(min(_final(r, "disk_processed_bytes") for r in runs))
    seen_hot = _seen_hot(runs)
    hots = {int(seen_hot)} if seen_hot > 0 else set()
    h = 256 * 1024
    while h <= memory:
        hots.add(h)
        h = int(h * 1.41)

    def candidate(hot: int, pattern: Pattern, rate_bps: float) -> Workload:
        resident = max(
            hot, min(int(_final(r, "memory_processed_bytes")) - hot * max(0, _rounds(r) - 2) for r in runs)
        )
        return Workload(
            name,
            disk_rate_bps=disk_rate,
            disk_hot_bytes=min(disk, max(64 * 1024, int(disk_rate * 4.0))),
            memory_rate_bps=rate_bps,
            memory_hot_bytes=hot,
            memory_pattern=pattern,
            memory_resident_bytes=min(memory, resident),
            disk_allocated_bytes=allocated,
        )

    sizes = sorted(x for x in hots if x > 0)
    out = [candidate(h, Pattern.SEQUENTIAL, 2.0 * h / DEFAULT_STEP_S) for h in sizes]
    # The hot set the rounds showed, also written in bursts: whether QEMU switched over by itself at a limit
    # the hot set does not fit tells a burst writer from one that writes all the time.
    if seen_hot > 0:
        out += [candidate(int(seen_hot), Pattern.PERIODIC, f * seen_hot) for f in PERIODIC_PASSES_PER_S]
    return out


def _loss(
    runs: Sequence[RecordedRun], workload: Workload, link: Link, tick_s: float, *, downtime: bool = False
) -> float:
    """How far the sim with ``workload`` lands from ``runs``: a wrong outcome costs 10, bytes and total time
    their log ratio, and with ``downtime`` (once the switchover cost is known) the downtime error in units of
    ``DOWNTIME_LOSS_SCALE_MS``. The downtime is what pins the hot set of a guest QEMU switches over by
    itself: the pause moves what the guest rewrites between two dirty syncs."""
    total = 0.0
    for r in runs:
        p = predict_migration(
            r.droplet_id,
            memory_bytes=r.memory_bytes,
            disk_bytes=r.disk_bytes,
            workload=workload,
            link=link,
            cap_mibps=r.cap_mibps,
            tick_s=tick_s,
            timeout_s=max(20.0, r.duration_s * 2),
            assess_risk=False,
        )
        if p.converges != r.converged:
            total += 10.0
        total += abs(math.log(max(p.bytes_transferred, 1) / max(r.bytes_transferred, 1)))
        total += abs(math.log(max(p.duration_s, 0.05) / max(r.duration_s, 0.05)))
        if downtime and p.downtime_ms is not None and r.downtime_ms is not None:
            total += abs(p.downtime_ms - r.downtime_ms) / DOWNTIME_LOSS_SCALE_MS
    return total


def fit_workload(
    name: str,
    runs: Sequence[RecordedRun],
    link: Link | None = None,
    *,
    tick_s: float = DEFAULT_TICK_S,
    downtime: bool = False,
    candidates: Sequence[Workload] | None = None,
    sync_disk_writes: bool = True,
) -> Workload:
    """A droplet's workload: of the candidates its samples allow (or ``candidates``), the one whose
    simulation of its own runs comes closest (outcome, bytes, total time, and with ``downtime`` the downtime
    too)."""
    link = link or Link(source=HostModel(sync_disk_writes=sync_disk_writes))
    return _ranked(name, runs, link, tick_s, downtime, candidates)[0]


def _ranked(
    name: str,
    runs: Sequence[RecordedRun],
    link: Link,
    tick_s: float,
    downtime: bool,
    candidates: Sequence[Workload] | None = None,
) -> list[Workload]:
    """The candidate workloads, best first."""
    sync = link.source.sync_disk_writes
    pool = list(candidates) if candidates is not None else _candidates(name, runs, sync_disk_writes=sync)
    losses = [_loss(runs, w, link, tick_s, downtime=downtime) for w in pool]
    return [w for _, _, w in sorted(zip(losses, range(len(pool)), pool, strict=True))]


def fixed_costs(
    runs: Sequence[RecordedRun],
    workloads: Mapping[str, Workload],
    link_bps: float,
    *,
    tick_s: float = DEFAULT_TICK_S,
    sync_disk_writes: bool = True,
    mirror_bps: float | None = None,
) -> HostModel:
    """The fixed costs: the median of what each converged run took beyond what the sim with no fixed cost
    predicts for it (total time: ``setup_s``; downtime: ``switchover_ms``). Medians, because the real runs
    scatter around them (on the loaded two-core harness: ±0.5 s and ±60 ms for the same guest)."""
    free = HostModel(setup_s=0.0, switchover_ms=0.0, sync_disk_writes=sync_disk_writes, mirror_bps=mirror_bps)
    bare = Link(link_bps, free, free)
    extra_s: list[float] = []
    extra_ms: list[float] = []
    for r in runs:
        if not r.converged:
            continue
        p = predict_migration(
            r.droplet_id,
            memory_bytes=r.memory_bytes,
            disk_bytes=r.disk_bytes,
            workload=workloads[r.droplet_id],
            link=bare,
            cap_mibps=r.cap_mibps,
            tick_s=tick_s,
            timeout_s=max(60.0, r.duration_s * 3),
            assess_risk=False,
        )
        if p.converges:
            extra_s.append(r.duration_s - p.duration_s)
            if r.downtime_ms is not None and p.downtime_ms is not None:
                extra_ms.append(r.downtime_ms - p.downtime_ms)
    setup_s = min(3600.0, max(0.0, statistics.median(extra_s))) if extra_s else HostModel().setup_s
    switchover_ms = (
        min(60_000.0, max(0.0, statistics.median(extra_ms))) if extra_ms else HostModel().switchover_ms
    )
    return HostModel(
        setup_s=setup_s, switchover_ms=switchover_ms, sync_disk_writes=sync_disk_writes, mirror_bps=mirror_bps
    )


def calibrate(
    runs: Sequence[RecordedRun], *, tick_s: float = DEFAULT_TICK_S, sync_disk_writes: bool = True
) -> Calibration:
    """Fit the sim to real runs, in four steps (simulating the disk mirror the runs used:
    ``sync_disk_writes``, the write-blocking one, the libvirt driver's default since ``e82d636``, or
    libvirt's background mirror; the fitted ``host`` says which):

    1. the link, and the disk mirror's speed when it is slower (``link_and_mirror``);
    2. per droplet, the workload whose simulation of its runs matches their outcome, bytes and total time;
    3. the fixed costs (``fixed_costs``) with those workloads;
    4. per droplet again, now with the costs known, matching the downtime too (it tells how much QEMU moved
       in the pause, i.e. the hot set), and the fixed costs once more with the final workloads; then once
       more under those costs, so that each choice is the best under the host it is returned with.
    """
    if not runs:
        raise ValueError("no recorded migrations to calibrate from")
    by_droplet: dict[str, list[RecordedRun]] = {}
    for r in runs:
        by_droplet.setdefault(r.droplet_id, []).append(r)
    link_bps, mirror_bps = link_and_mirror(runs)
    start = HostModel(sync_disk_writes=sync_disk_writes, mirror_bps=mirror_bps)
    first = Link(link_bps, start, start)
    ranked = {d: _ranked(d, rs, first, tick_s, False) for d, rs in by_droplet.items()}
    workloads = {d: r[0] for d, r in ranked.items()}

    def costs(chosen: Mapping[str, Workload]) -> HostModel:
        return fixed_costs(
            runs, chosen, link_bps, tick_s=tick_s, sync_disk_writes=sync_disk_writes, mirror_bps=mirror_bps
        )

    def refit(host: HostModel) -> dict[str, Workload]:
        # Only the best few of step 2: the downtime decides between workloads that already fit the bytes and
        # time, and trying every candidate again doubled the calibration's cost.
        link = Link(link_bps, host, host)
        return {
            d: fit_workload(
                d, by_droplet[d], link, tick_s=tick_s, downtime=True, candidates=r[:REFIT_CANDIDATES]
            )
            for d, r in ranked.items()
        }

    host = costs(workloads)
    workloads = refit(host)
    host = costs(workloads)
    # The choice must hold under the costs it is returned with. Step 4 chose under step 3's costs, and a
    # few tens of ms of setup move the copy against the controller's ticks: the 8 MiB writer's 11 MiB
    # candidate paused ~30 ms in the sim under a setup of 2.07 s and 362 ms under 2.12 s (real: 22 ms).
    again = refit(host)
    if again != workloads:
        workloads, host = again, costs(again)
    return Calibration(link_bps, host, workloads)


# ---- an evacuation's forecast ------------------------------------------------------------------------------
