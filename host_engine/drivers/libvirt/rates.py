"""Rates and bounds computed from ``jobStats`` samples: pure arithmetic, no libvirt."""

from __future__ import annotations

from dataclasses import dataclass, field

# Rates are averaged over this window (``Progress.rate_window_s``); samples closer than the gap are merged.
RATE_WINDOW_S = 8.0
MIN_SAMPLE_GAP_S = 0.05


@dataclass
class Sample:
    at_s: float
    processed_bytes: int
    disk_written_bytes: int


@dataclass
class RateEstimator:
    """(transfer, guest disk write) rates in B/s, averaged over the last ``window_s`` seconds.

    Averaged because QEMU's disk mirror moves data in bursts (up to 16 MiB, then sleeps to honour the
    bandwidth cap): one-tick deltas swing between zero and line rate, and a controller fed with them
    would see "no transfer" half the time.

    The window starts no earlier than the last sample before the first byte moved: libvirt's set-up
    (starting the target QEMU, the NBD export) takes 1-5 s under TCG with nothing sent, and averaged in
    it made a guest streaming at a 48 MiB/s cap read 22-38 MiB/s when its second memory round began
    (measured), so the controller took a dirty rate of 32 MiB/s for one the link could not outrun.
    """

    window_s: float = RATE_WINDOW_S
    min_gap_s: float = MIN_SAMPLE_GAP_S
    samples: list[Sample] = field(default_factory=list)

    def add(self, sample: Sample) -> tuple[float, float]:
        samples = self.samples
        if samples and samples[-1].processed_bytes == 0 and sample.processed_bytes == 0:
            samples.clear()  # nothing moved yet: the set-up is no part of a transfer rate
        if not samples or sample.at_s - samples[-1].at_s >= self.min_gap_s:
            samples.append(sample)
        while len(samples) > 2 and sample.at_s - samples[1].at_s >= self.window_s:
            samples.pop(0)
        first = samples[0]
        dt = sample.at_s - first.at_s
        if dt <= 0:
            return (0.0, 0.0)
        rate = max(0, sample.processed_bytes - first.processed_bytes) / dt
        disk_rate = max(0, sample.disk_written_bytes - first.disk_written_bytes) / dt
        return (rate, disk_rate)
