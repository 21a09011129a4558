"""How a copy walks a droplet's blocks and pages, and how a workload dirties them: the passes of the disk
mirror and of memory pre-copy (QEMU's rounds), the writes of a hot set, and what QEMU's first round still
counts as left (zero pages ahead of its scan). Functions over ``entities``' state, no time of their own.
"""

from __future__ import annotations

import array
import math

from host_engine.drivers.sim.entities import Droplet, Migration
from host_engine.drivers.sim.workloads import Pattern


def unscanned_zero_pages(mig: Migration, d: Droplet) -> int:
    """Zero pages QEMU's first memory round has not reached yet.

    QEMU's dirty bitmap starts with every page set, zero pages included, and a page leaves it only when the
    round's scan reaches it (a zero page then costs a few header bytes). So during round 1 the remainder
    QEMU compares with ``bandwidth x downtime limit`` still counts the zero pages ahead of the scan: a guest
    with a big hot set at the start of its RAM is not switched over the moment round 1 starts, but only once
    the scan has passed enough of the RAM (measured: the 48 MiB writer sent ~50 MiB in round 1, then its
    48 MiB hot set in the pause). The sim sends only pages that hold data, in address order; the zero pages
    ahead are those past the next page to send, less the data pages still to send.
    """
    if mig.round != 1 or mig.spec.offline:
        return 0
    ahead = len(mig.memory_pass) - mig.memory_pos
    at = mig.memory_pass[mig.memory_pos] if ahead > 0 else d.memory_pages
    return max(0, d.memory_pages - at - ahead)


def whole_units(x: float) -> tuple[int, float]:
    """``x`` split into its whole part and the fraction carried to the next step."""
    n = math.floor(x)
    return n, x - n


def periodic_writes(units: float, hot: int) -> tuple[int, float]:
    """A ``PERIODIC`` writer's writes in one step: ``units`` (blocks/pages its rate adds, with the carry)
    become whole passes over the ``hot`` set, written at once; the rest is carried until it makes a pass.

    >>> periodic_writes(130.5, 100)  # one pass, 30.5 carried
    (100, 30.5)
    >>> periodic_writes(99.0, 100)  # not a whole pass yet: nothing written
    (0, 99.0)
    """
    passes = math.floor(units / hot + 1e-9)
    return passes * hot, max(0.0, units - passes * hot)


def burst_offset_s(carry: float, units_per_s: float, hot: int, dt: float) -> float | None:
    """When, within a step of ``dt`` seconds, a ``PERIODIC`` writer's next pass comes (its carry reaching a
    whole hot set at ``units_per_s``), or None if not in this step.

    >>> burst_offset_s(80.0, 1000.0, 100, 0.05)  # 20 units to go at 1000/s: 20 ms in
    0.02
    >>> burst_offset_s(10.0, 1000.0, 100, 0.05) is None  # 90 to go: 90 ms, after this step
    True
    """
    if units_per_s <= 0:
        return None
    at = max(0.0, hot - carry) / units_per_s
    return round(at, 9) if at < dt else None


def dirty(
    d: Droplet,
    versions: array.array[int],
    pending: set[int],
    start: int,
    hot: int,
    n: int,
    pattern: Pattern,
    cursor: int,
) -> int:
    """Write ``n`` blocks of the hot set ``[start, start + hot)``; returns the new sequential cursor."""
    if pattern is Pattern.PERIODIC:
        n = hot if n >= hot else 0  # whole passes only (``periodic_writes``); one pass dirties them all
    if pattern is not Pattern.RANDOM and n >= hot:
        # A sweep over the whole hot set (the diabolical guest, a periodic burst): every block at once.
        versions[start : start + hot] = array.array("q", range(d.version + 1, d.version + hot + 1))
        d.version += hot
        pending.update(range(start, start + hot))
        return start + (cursor - start + n) % hot
    for _ in range(n):
        if pattern is not Pattern.RANDOM:
            i = cursor
            cursor = start + (i - start + 1) % hot
        else:
            i = start + d.randrange(hot)
        versions[i] = d.bump()
        pending.add(i)
    return cursor


def next_pending(pending: set[int], mig: Migration, *, disk: bool) -> int | None:
    """The next block/page of the current pass that is still pending; starts a new pass when one ends."""
    order = mig.disk_pass if disk else mig.memory_pass
    pos = mig.disk_pos if disk else mig.memory_pos
    for _ in range(2):
        while pos < len(order):
            i = order[pos]
            pos += 1
            if i in pending:
                if disk:
                    mig.disk_pos = pos
                else:
                    mig.memory_pos = pos
                return i
        # Pass over: the next one covers what was dirtied meanwhile (a new memory round).
        if disk:
            mig.disk_first_pass_done = True
        order, pos = sorted(pending), 0
        if disk:
            mig.disk_pass = order
        else:
            mig.memory_pass = order
            mig.round += 1
    return None
