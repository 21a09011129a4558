"""The harness guest's spread mode (guest.S ``SUBTICKS``) on a real libvirt host: the benchmarks' 48 MiB guest
rewrites its set in 16 slices per 55 ms tick instead of one burst; its rates must stay what its spec says.

Needs root, libvirtd, QEMU and binutils: skipped locally without them, failed under CI=true.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.libvirt_harness import support
from tests.libvirt_harness.guest import SPREAD_48_GUEST, TICKS_PER_S, GuestSpec, read_counters
from tests.libvirt_harness.support import Conns, start_guest

hosts = support.hosts
conns = support.conns

WINDOW_S = 3.0


@pytest.mark.libvirt
def test_spread_guest_passes_at_its_timer_rate_and_keeps_its_per_tick_disk_rate(
    hosts: Any, conns: Conns
) -> None:
    dom = start_guest(hosts, conns, "spread48", SPREAD_48_GUEST)
    try:
        before, t0 = read_counters(dom), time.monotonic()
        time.sleep(WINDOW_S)
        after, t1 = read_counters(dom), time.monotonic()
    finally:
        dom.destroy()
        dom.undefine()
    passes_per_s = (after.passes - before.passes) / (t1 - t0)
    sectors_per_s = (after.sectors_written - before.sectors_written) / (t1 - t0)
    # 16 passes of 3 MiB per BIOS tick: the whole 48 MiB 18.2 times a second, as the burst guest.
    assert 0.75 * 16 * TICKS_PER_S <= passes_per_s <= 1.25 * 16 * TICKS_PER_S, passes_per_s
    # The disk is written on every 16th pass only: 32 sectors per BIOS tick, not per pass.
    assert 0.75 * 32 * TICKS_PER_S <= sectors_per_s <= 1.25 * 32 * TICKS_PER_S, sectors_per_s
    assert after.disk_errors == 0


@pytest.mark.parametrize("subticks", [0, 3, 512, -2])
def test_guest_spec_refuses_a_timer_rate_the_boot_sector_cannot_pace(subticks: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        GuestSpec(subticks=subticks)
