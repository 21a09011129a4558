"""The libvirt driver's transfer rate (host_engine.drivers.libvirt.rates.RateEstimator): averaged over 8 s, but
never over libvirt's set-up before the first byte moved."""

from __future__ import annotations

from host_engine.drivers.libvirt.rates import RateEstimator, Sample

MiB = 1024 * 1024


def test_rate_leaves_out_the_set_up_before_the_first_byte() -> None:
    """Measured on the harness (memory stream at a 48 MiB/s cap): 5 s of set-up with nothing sent, then the
    transfer at the cap. At 8.5 s the 8 s average read 22 MiB/s; the link moved 48."""
    est = RateEstimator()
    rate = 0.0
    for tick in range(35):
        at_s = tick * 0.25
        sent = max(0.0, at_s - 5.0) * 48 * MiB
        rate, _ = est.add(Sample(at_s, int(sent), 0))
    assert 47 * MiB <= rate <= 49 * MiB


def test_rate_still_averages_a_stall_after_the_transfer_began() -> None:
    """Only the set-up is left out: seconds without progress once bytes moved count (a stall reads slow)."""
    est = RateEstimator()
    rate = 0.0
    for tick in range(33):
        at_s = tick * 0.25
        sent = min(at_s, 2.0) * 48 * MiB  # 2 s at 48 MiB/s, then nothing for 6 s
        rate, _ = est.add(Sample(at_s, int(sent), 0))
    assert rate <= 13 * MiB
