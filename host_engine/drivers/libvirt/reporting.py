"""What a running migration reports: ``Progress`` snapshots built from ``jobStats()``, the guest's disk write
rate (``blockStats`` deltas) and the domain events (switchover, job completed with its downtime)."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Mapping
from typing import Any

from host_engine.drivers.base import DriverError, Phase, Progress
from host_engine.drivers.libvirt.connection import libvirt_module
from host_engine.drivers.libvirt.job import MigrationJob
from host_engine.drivers.libvirt.rates import Sample

log = logging.getLogger(__name__)

# QEMU's page size when jobStats does not say.
DEFAULT_PAGE_SIZE = 4096

# jobStats counters that only grow during one job: what was sent stays sent.
SENT_COUNTERS = ("data_processed", "data_total", "disk_processed", "disk_total", "memory_processed")


def memory_rate(completed: Mapping[str, Any], fallback: float) -> float:
    """A completed job's transfer rate: QEMU's own measure of its memory copy (``memory_bps``: its bytes over
    its transfer time), else ``fallback``. The driver's own rate is over an 8 s window and a tick apart, far
    below it when the copy is over within a tick (harness: 37-74 MB/s against QEMU's 1.2-1.3 GB/s); the
    calibration reads the link from it (``host_engine.calibration.link_and_mirror``)."""
    try:
        rate = float(completed.get("memory_bps", 0) or 0)
    except (TypeError, ValueError):
        return fallback
    return rate if math.isfinite(rate) and rate > 0 else fallback


def completed_with_sent(last: Mapping[str, Any], completed: Mapping[str, Any]) -> dict[str, Any]:
    """The completed job's stats, never counting fewer bytes than the last running sample showed sent.

    ``last`` is the last ``jobStats()`` of the running job (source domain); ``completed`` is libvirt's
    completed-job statistics (the ``JOB_COMPLETED`` event or ``jobStats(COMPLETED)`` on the target). The
    completed stats can omit the NBD disk mirror: libvirt's ``disk_*`` fields there are QEMU's own migration
    counters, and the mirror's bytes are added only from the block jobs libvirt last queried; the copy the
    target gets through the migration cookie has none. Seen on the real harness (issue 11): ``disk_total``
    0 and ``data_processed`` = memory only (1.3 MiB) after samples had shown 44.4 MiB sent. Each counter in
    ``SENT_COUNTERS`` is therefore the larger of the two sources, and ``data_processed`` (the attempt's
    bytes) is the completed total plus the disk bytes it left out (the last sample's ``disk_processed`` above
    the completed one): the final memory pass the completed stats count is kept too. Every other field is
    the completed stats' when present (``downtime``, ``time_elapsed``), else the last sample's.
    """
    merged = {**last, **completed}
    for key in SENT_COUNTERS:
        if key in last or key in completed:
            merged[key] = max(int(last.get(key) or 0), int(completed.get(key) or 0))
    if "data_processed" in completed:
        disk_left_out = max(
            0, int(last.get("disk_processed") or 0) - int(completed.get("disk_processed") or 0)
        )
        merged["data_processed"] = max(
            int(last.get("data_processed") or 0), int(completed["data_processed"] or 0) + disk_left_out
        )
    return merged


class ProgressReporter(MigrationJob):
    """``progress()`` of one attempt: the job's state as the controller sees it."""

    def progress(self) -> Progress:
        """A snapshot stamped with the time it was *true*: the clock is read after libvirt answered.

        A call that blocks (libvirt busy completing the job) therefore makes the snapshot late, never
        stale-but-young: the controller's deadlines (switchover, stall) count from what was observed when.
        """
        lv = libvirt_module()
        thread = self._thread
        if thread is not None and not thread.is_alive():
            return self._final_progress()
        stats: dict[str, Any] = {}
        if thread is not None and self._dom is not None:
            try:
                stats = self._job_stats(self._dom)
            except lv.libvirtError as e:
                log.debug("migration %s: jobStats: %s", self.spec.migration_id, e)
        if thread is not None and not thread.is_alive():
            return self._final_progress()  # the job ended while we asked: its end is the truth
        if stats.get("type", lv.VIR_DOMAIN_JOB_NONE) != lv.VIR_DOMAIN_JOB_NONE:
            self._last_stats = stats
            self._update_phase(stats)
        else:
            stats = self._last_stats
            if self._events.switchover_seen and self._phase in (Phase.DISK, Phase.MEMORY):
                # QEMU paused the source for its last pass and libvirt is finishing the job (no stats now).
                self._advance(Phase.SWITCHOVER)
        return self._progress_from(stats)

    def _job_stats(self, dom: Any) -> dict[str, Any]:
        """``jobStats()`` of the running job (its own method so a test can make it slow)."""
        return dict(dom.jobStats())

    def _update_phase(self, stats: Mapping[str, Any]) -> None:
        lv = libvirt_module()
        if self._events.switchover_seen:
            self._advance(Phase.SWITCHOVER)
            return
        with contextlib.suppress(lv.libvirtError):
            state, reason = self._dom.state()
            paused_for_switchover = state == lv.VIR_DOMAIN_PAUSED and reason in (
                lv.VIR_DOMAIN_PAUSED_MIGRATION,
                lv.VIR_DOMAIN_PAUSED_USER,
            )
            if paused_for_switchover and not self.spec.offline and int(stats.get("memory_processed", 0)):
                self._advance(Phase.SWITCHOVER)
                return
        if int(stats.get("memory_processed", 0)) > 0 or int(stats.get("memory_iteration", 0)) > 0:
            self._advance(Phase.MEMORY)
        else:
            self._advance(Phase.DISK)

    def _progress_from(self, stats: Mapping[str, Any]) -> Progress:
        mem_total = int(stats.get("memory_total", 0)) or self.spec.memory_bytes
        mem_processed = int(stats.get("memory_processed", 0))
        if self._phase in (Phase.PREPARING, Phase.DISK):
            # Until the mirror is in sync QEMU has not begun memory: all of it is still to copy.
            mem_remaining = mem_total
        else:
            mem_remaining = self._memory_left.update(
                int(stats.get("memory_iteration", 0)), int(stats.get("memory_remaining", 0))
            )
        disk_total = int(stats.get("disk_total", 0))
        disk_processed = int(stats.get("disk_processed", 0))
        disk_remaining = int(stats.get("disk_remaining", 0))
        if disk_total == 0:
            # The mirror has not started (the target QEMU is starting): every disk byte is still to copy.
            disk_total = disk_remaining = sum(d.size_bytes for d in self._disks)
        processed = int(stats.get("data_processed", mem_processed + disk_processed))
        page = int(stats.get("memory_page_size", DEFAULT_PAGE_SIZE)) or DEFAULT_PAGE_SIZE
        written = self._disk_written_bytes()
        now = self._clock()  # after every libvirt call of this sample
        elapsed = now - self._started_at if self._started_at is not None else 0.0
        rate, disk_rate = self._rates.add(Sample(now, processed, written))
        if self.write_blocking_mirror:
            # The write-blocking mirror copies each guest write as it happens: the guest dirties nothing the
            # mirror must copy again, so the controller never limits its writes for the mirror's sake.
            disk_rate = 0.0
        if self.bandwidth_mibps > 0:
            rate = min(rate, float(self.bandwidth_mibps * 1024 * 1024))
        return Progress(
            phase=self._phase,
            elapsed_s=elapsed,
            round=int(stats.get("memory_iteration", 0)),
            disk_total_bytes=disk_total,
            disk_processed_bytes=disk_processed,
            disk_remaining_bytes=disk_remaining,
            memory_total_bytes=mem_total,
            memory_processed_bytes=mem_processed,
            memory_remaining_bytes=mem_remaining,
            disk_dirty_rate_bps=disk_rate,
            memory_dirty_rate_bps=float(stats.get("memory_dirty_rate", 0)) * page,
            transfer_rate_bps=rate,
            disk_write_limit_bps=self._disk_limit_bps,
            memory_throttle_pct=self._throttle_pct,
            memory_throttle_in_force_pct=self._throttle_in_force(stats),
            downtime_ms=None,
            bytes_transferred=processed,
            rate_window_s=self._rates.window_s,
        )

    def _throttle_in_force(self, stats: Mapping[str, Any]) -> int | None:
        """QEMU's CPU throttle in force (``auto_converge_throttle``; absent while it does not throttle)."""
        if self.auto_converge != "controlled" or not stats:
            return None
        return int(stats.get("auto_converge_throttle", 0))

    def _final_progress(self) -> Progress:
        lv = libvirt_module()
        self._settle()
        stats = self._events.completed_stats or {}
        if not stats and self._phase is Phase.DONE:
            with contextlib.suppress(lv.libvirtError, DriverError):
                tdom = self._target().lookupByUUIDString(self._uuid)
                stats = dict(tdom.jobStats(lv.VIR_DOMAIN_JOB_STATS_COMPLETED))
                self._events.completed_stats = stats
        merged = completed_with_sent(self._last_stats, stats)
        base = self._progress_from(merged)
        elapsed = base.elapsed_s
        downtime = merged.get("downtime")
        processed = int(merged.get("data_processed", base.bytes_transferred))
        done = self._phase is Phase.DONE
        return Progress(
            phase=self._phase,
            elapsed_s=float(merged.get("time_elapsed", elapsed * 1000)) / 1000 if done else elapsed,
            round=base.round,
            disk_total_bytes=base.disk_total_bytes,
            disk_processed_bytes=base.disk_total_bytes if done else base.disk_processed_bytes,
            disk_remaining_bytes=0 if done else base.disk_remaining_bytes,
            memory_total_bytes=base.memory_total_bytes,
            memory_processed_bytes=base.memory_processed_bytes,
            memory_remaining_bytes=0 if done else base.memory_remaining_bytes,
            disk_dirty_rate_bps=0.0,
            memory_dirty_rate_bps=0.0,
            transfer_rate_bps=memory_rate(merged, base.transfer_rate_bps) if done else base.transfer_rate_bps,
            disk_write_limit_bps=self._disk_limit_bps,
            memory_throttle_pct=self._throttle_pct,
            downtime_ms=float(downtime) if downtime is not None and done else None,
            bytes_transferred=processed,
            error=None if done else self._error_text(),
            target_at_fault=self._target_at_fault,
            rate_window_s=self._rates.window_s,
        )

    def _disk_written_bytes(self) -> int:
        lv = libvirt_module()
        total = 0
        if self._dom is None:
            return 0
        for disk in self._disks:
            with contextlib.suppress(lv.libvirtError):
                total += int(self._dom.blockStats(disk.target)[3])
        return total
