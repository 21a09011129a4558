"""The temporary disk write limit: when the mirror's tail needs it, and as the last resort before a stall."""

from __future__ import annotations

from dataclasses import replace  # noqa: F401 - the worked examples (doctests) use it

from host_engine.controller_config import ControllerConfig, GiB, MiB  # noqa: F401 - the worked examples use them
from host_engine.controller_config import example_progress as _example  # noqa: F401 - the worked examples use them
from host_engine.controller_state import ControllerState
from host_engine.drivers.base import Phase, Progress


def disk_write_limit(progress: Progress, config: ControllerConfig) -> int | None:
    """The disk write limit this snapshot calls for, or ``None`` for no limit.

    A new limit only while the disk mirror copies (phase ``DISK``: once libvirt moves on to memory the mirror
    is in sync, and a limit then bought nothing, measured), only when the modified blocks left fit
    ``disk_limit_window_s`` of transfer, and only while the guest dirties the disk at
    ≥ ``disk_fast_write_ratio`` of the transfer rate, so the tail shrinks by less than half a pass. Once a
    limit is in force it stays until the end (the dirty rate then measures the limit, not the guest, so
    re-testing it would flap); it is lifted the moment the migration is done or failed.

    Worked examples (link 1 GiB/s: "few" = under 5 GiB; "fast" = over 512 MiB/s; limit = 102.4 MiB/s):

    >>> cfg = ControllerConfig()
    >>> p = _example(phase=Phase.DISK, transfer_rate_bps=GiB, disk_remaining_bytes=2 * GiB,
    ...              disk_dirty_rate_bps=600 * MiB)
    >>> disk_write_limit(p, cfg) == int(0.1 * GiB)
    True

    The same writes once the mirror is in sync (memory phase): no new limit.

    >>> disk_write_limit(replace(p, phase=Phase.MEMORY), cfg) is None
    True

    Many blocks left (a 40 GiB tail): a limit now would slow the guest for ~40 s. None.

    >>> disk_write_limit(replace(p, disk_remaining_bytes=40 * GiB), cfg) is None
    True

    A log writer at 50 MiB/s: the mirror keeps up without help. None.

    >>> disk_write_limit(replace(p, disk_dirty_rate_bps=50 * MiB), cfg) is None
    True

    Switchover done: always lifted, whatever was in force.

    >>> disk_write_limit(replace(p, phase=Phase.DONE, disk_write_limit_bps=10 * MiB), cfg) is None
    True
    """
    if progress.phase not in (Phase.DISK, Phase.MEMORY, Phase.SWITCHOVER):
        return None
    if progress.disk_write_limit_bps is not None:
        return progress.disk_write_limit_bps
    if not config.disk_limit_enabled or progress.phase is not Phase.DISK:
        return None
    rate = progress.transfer_rate_bps
    if rate <= 0 or progress.disk_remaining_bytes <= 0:
        return None
    few_left = progress.disk_remaining_bytes <= rate * config.disk_limit_window_s
    writes_fast = progress.disk_dirty_rate_bps >= rate * config.disk_fast_write_ratio
    if not (few_left and writes_fast):
        return None
    return max(config.disk_limit_floor_bps, int(rate * config.disk_limit_ratio))


def last_resort_disk_limit(
    progress: Progress, config: ControllerConfig, state: ControllerState
) -> int | None:
    """The disk write limit to apply instead of calling a stall, or None.

    ``disk_write_limit`` waits for few blocks to remain, but a guest that writes its disk faster than its
    share of the link (several migrations on one NIC, a slow link) never lets the remainder get "few": the
    mirror plateaus and the stall rule would abort. Before that happens, when the remainder has made no new
    low for ``stall_timeout_s`` and the guest writes at >= ``disk_fast_write_ratio`` of the transfer rate, the
    limit goes on anyway: the one thing that lets such a copy end. Still temporary, still lifted at the end.

    Worked example: a database writing 1000 MiB/s with a third of a 10 Gbit/s link (~400 MiB/s), its mirror
    stuck at ~7 GiB for 30 s: limit it to 10 % of the link share.

    >>> cfg = ControllerConfig()
    >>> p = _example(phase=Phase.DISK, elapsed_s=100.0, transfer_rate_bps=400 * MiB,
    ...              disk_remaining_bytes=7 * GiB, disk_dirty_rate_bps=1000 * MiB)
    >>> last_resort_disk_limit(p, cfg, ControllerState(best_remaining_at_s=70.0)) == 40 * MiB
    True

    Stuck for 20 s only: not yet.

    >>> last_resort_disk_limit(p, cfg, ControllerState(best_remaining_at_s=80.0)) is None
    True
    """
    if progress.phase not in (Phase.DISK, Phase.MEMORY) or not config.disk_limit_enabled:
        return None
    if progress.disk_write_limit_bps is not None or progress.disk_remaining_bytes <= 0:
        return None
    rate = progress.transfer_rate_bps
    if rate <= 0 or progress.disk_dirty_rate_bps < rate * config.disk_fast_write_ratio:
        return None
    if progress.elapsed_s - state.best_remaining_at_s < config.stall_timeout_s:
        return None
    return max(config.disk_limit_floor_bps, int(rate * config.disk_limit_ratio))
