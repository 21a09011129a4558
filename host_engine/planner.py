"""The planner: turns "evacuate this host" or "move this droplet" into spaced, ``planned`` migrations.

Placement says where each droplet goes (:mod:`host_engine.placement`); the planner says when. Every migration
is given a slot ``[not_before, not_before + estimate)``, the estimate being (disk + memory) ÷ the configured
bandwidth + a fixed overhead, and slots are laid out greedily, largest droplet first, at the earliest time
from ``start`` where they overlap at most ``max_parallel - 1`` other slots fleet-wide,
``max_per_target - 1`` into the same target and ``max_per_source - 1`` out of the same source (active
migrations already in the store count too). The guest is told ``notice`` before its own ``not_before``.

Reading the fleet, placing, and writing the migrations (and the host's ``maintenance`` state) happen in ONE
transaction under the planner lock, so two plans cannot both count the same free room, and a plan that cannot
place every droplet writes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from host_engine import requests as operator_requests
from host_engine.config import EngineConfig, PlacementConfig, ScheduleConfig
from host_engine.errors import Conflict, InvalidInput, NoCapacity
from host_engine.models import Droplet, Host, Migration, NewMigration
from host_engine.placement import Choice, Placer, Plan
from host_engine.states import ACTIVE_STATES, CANCELLABLE, HostState, MigrationState
from host_engine.store import Store, Tx
from host_engine.timeparse import format_duration, format_time
from host_engine.units import format_size

log = logging.getLogger(__name__)

MiB = 1024 * 1024

# ``--start now`` (and ``migrate --now``) is read when the command parses it, a moment before the transaction
# checks it: a start this little before the transaction's "now" is still "now", not "in the past".
START_SLACK = timedelta(seconds=5)


@dataclass(frozen=True)
class Limits:
    max_parallel: int
    max_per_target: int
    max_per_source: int

    def __post_init__(self) -> None:
        for name in ("max_parallel", "max_per_target", "max_per_source"):
            if getattr(self, name) < 1:
                raise InvalidInput(f"--{name.replace('_', '-')} must be at least 1", field=name)


@dataclass(frozen=True)
class Slot:
    source: str
    target: str
    start: datetime
    end: datetime


@dataclass(frozen=True)
class ScheduledMove:
    droplet: Droplet
    choice: Choice
    not_before: datetime
    notice_at: datetime
    estimate: timedelta

    @property
    def target(self) -> str:
        return self.choice.target or ""

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.choice.to_dict(),
            "not_before": format_time(self.not_before),
            "notice_at": format_time(self.notice_at),
            "estimate_s": int(self.estimate.total_seconds()),
        }


@dataclass(frozen=True)
class Request:
    """What the engineer asked for, validated."""

    start: datetime
    notice: timedelta
    limits: Limits
    reason: str = ""
    requested_by: str = ""
    unsafe_short_notice: bool = False
    # ``--bandwidth``: each migration's own cap (whole MiB/s), stored with it; None: the configured default.
    bandwidth_mibps: int | None = None


@dataclass(frozen=True)
class Schedule:
    source: str
    plan: Plan
    moves: tuple[ScheduledMove, ...]
    skipped: tuple[str, ...]  # droplets already migrating

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "moves": [m.to_dict() for m in self.moves],
            "already_migrating": list(self.skipped),
        }


def validate_request(request: Request, cfg: ScheduleConfig, now: datetime) -> None:
    """Refuse a start in the past, a notice under the minimum (unless unsafe), or too soon to notify."""
    if request.notice < timedelta(0):
        raise InvalidInput(
            f"--notice must not be negative, got {format_duration(request.notice)}", field="notice"
        )
    if request.notice < cfg.minimum_notice and not request.unsafe_short_notice:
        raise InvalidInput(
            f"--notice {format_duration(request.notice)} is shorter than the "
            f"{format_duration(cfg.minimum_notice)} minimum owners are promised "
            "(--unsafe-short-notice overrides, for demos and tests)",
            field="notice",
        )
    if request.start < now - START_SLACK:
        raise InvalidInput(
            f"--start {format_time(request.start)} is in the past (now {format_time(now)})", field="start"
        )
    if request.start - request.notice < now - START_SLACK:
        raise InvalidInput(
            f"--start {format_time(request.start)} is too soon for a {format_duration(request.notice)} "
            f"notice; the earliest start is {format_time(now + request.notice)}",
            field="start",
        )


def estimate(droplet: Droplet, cfg: ScheduleConfig, bandwidth_mibps: int | None = None) -> timedelta:
    """How long a migration of ``droplet`` holds its slot: (disk + memory) / bandwidth + overhead, the
    bandwidth being the migration's own cap (``--bandwidth``) when it has one, else ``[schedule]``'s.

    >>> from host_engine.config import ScheduleConfig
    >>> d = Droplet("d1", "hv1", 1, 1024**3, 9 * 1024**3)
    >>> estimate(d, ScheduleConfig()), estimate(d, ScheduleConfig(), bandwidth_mibps=100)
    (datetime.timedelta(seconds=130), datetime.timedelta(seconds=222))
    """
    bps = bandwidth_mibps * MiB if bandwidth_mibps else cfg.bandwidth_bps
    copy_s = (droplet.disk_bytes + droplet.memory_bytes) / bps
    return timedelta(seconds=round(copy_s)) + cfg.slot_overhead


def lay_out(
    moves: Sequence[tuple[Droplet, str, str]],
    start: datetime,
    limits: Limits,
    cfg: ScheduleConfig,
    existing: Iterable[Slot] = (),
    *,
    bandwidth_mibps: int | None = None,
) -> list[tuple[datetime, timedelta]]:
    """(not_before, estimate) for each (droplet, source, target), in order, within the limits."""
    slots = list(existing)
    out = []
    for droplet, source, target in moves:
        dur = estimate(droplet, cfg, bandwidth_mibps)
        t = start
        while True:
            end = t + dur
            overlapping = [s for s in slots if s.start < end and t < s.end]
            total = len(overlapping)
            into = sum(1 for s in overlapping if s.target == target)
            out_of = sum(1 for s in overlapping if s.source == source)
            if (
                total < limits.max_parallel
                and into < limits.max_per_target
                and out_of < limits.max_per_source
            ):
                break
            blocking = [
                s.end
                for s in overlapping
                if total >= limits.max_parallel
                or (s.target == target and into >= limits.max_per_target)
                or (s.source == source and out_of >= limits.max_per_source)
            ]
            t = min(blocking)
        slots.append(Slot(source, target, t, t + dur))
        out.append((t, dur))
    return out


def _existing_slots(tx: Tx, cfg: ScheduleConfig) -> list[Slot]:
    active = tx.list_migrations(states=ACTIVE_STATES)
    if not active:
        return []
    sizes = {d.id: d for d in tx.list_droplets()}
    return [
        Slot(
            m.source_host,
            m.target_host,
            m.not_before,
            m.not_before + estimate(sizes[m.droplet_id], cfg, operator_requests.bandwidth_mibps(m.stats)),
        )
        for m in active
        if m.droplet_id in sizes
    ]


def _placer(tx: Tx, datacenter: str, cfg: PlacementConfig, droplets: Sequence[Droplet]) -> Placer:
    tags = tx.owner_tags_by_host(only=[d.owner_tag for d in droplets]) if cfg.anti_affinity else {}
    return Placer(tx.list_hosts(datacenter=datacenter), tx.usage_by_host(), tags, cfg)


def _describe_unplaced(c: Choice, d: Droplet) -> str:
    return (
        f"no host can take droplet {d.id} ({d.vcpus} vCPUs, {format_size(d.memory_bytes)}, "
        f"{format_size(d.disk_bytes)} disk): rejected {c.summary_of_rejections()}"
    )


def _migrating(tx: Tx, host_name: str) -> set[str]:
    """Droplets on ``host_name`` that already have an active migration."""
    return {m.droplet_id for m in tx.list_migrations(states=ACTIVE_STATES, source_host=host_name)}


def plan_placement(
    tx: Tx,
    source: Host,
    droplets: Sequence[Droplet],
    cfg: PlacementConfig,
    *,
    explain: Iterable[str] = (),
    only_target: str | None = None,
) -> Plan:
    placer = _placer(tx, source.datacenter, cfg, droplets)
    return placer.place(droplets, source, explain=explain, only_target=only_target)


def preview_evacuation(
    store: Store, host_name: str, config: EngineConfig, *, explain: Iterable[str] = ()
) -> Plan:
    """``plan evacuate``: where each droplet of ``host_name`` would go now. Writes nothing."""
    with store.begin(readonly=True) as tx:
        source = tx.get_host(host_name)
        busy = _migrating(tx, host_name)
        droplets = [d for d in tx.list_droplets(host=host_name) if d.id not in busy]
        explain = list(explain)
        known = {d.id for d in droplets}
        for did in explain:
            if did not in known:
                tx.get_droplet(did)  # NotFound for an unknown id
                raise InvalidInput(
                    f"droplet {did} is not on {host_name} (or is already migrating)", field="explain"
                )
        return plan_placement(tx, source, droplets, config.placement, explain=explain)


def _schedule(
    tx: Tx,
    source: Host,
    droplets: Sequence[Droplet],
    request: Request,
    config: EngineConfig,
    *,
    only_target: str | None = None,
) -> Schedule:
    plan = plan_placement(tx, source, droplets, config.placement, only_target=only_target)
    by_id = {d.id: d for d in droplets}
    for c in plan.unplaced:
        raise NoCapacity(f"cannot plan: {_describe_unplaced(c, by_id[c.droplet_id])}")
    triples = [(by_id[c.droplet_id], source.name, c.target or "") for c in plan.choices]
    times = lay_out(
        triples,
        request.start,
        request.limits,
        config.schedule,
        _existing_slots(tx, config.schedule),
        bandwidth_mibps=request.bandwidth_mibps,
    )
    moves = tuple(
        ScheduledMove(by_id[c.droplet_id], c, nb, nb - request.notice, dur)
        for c, (nb, dur) in zip(plan.choices, times, strict=True)
    )
    return Schedule(source.name, plan, moves, ())


def _write(tx: Tx, schedule: Schedule, request: Request, config: EngineConfig) -> list[Migration]:
    out = []
    for mv in schedule.moves:
        out.append(
            tx.create_migration(
                NewMigration(
                    droplet_id=mv.droplet.id,
                    source_host=schedule.source,
                    target_host=mv.target,
                    not_before=mv.not_before,
                    notice_at=mv.notice_at,
                    deadline=mv.not_before,
                    reason=request.reason,
                    requested_by=request.requested_by,
                    max_attempts=config.schedule.max_attempts,
                    stats=operator_requests.with_bandwidth(
                        {
                            "placement_score": mv.choice.score,
                            "estimate_s": int(mv.estimate.total_seconds()),
                        },
                        request.bandwidth_mibps,
                    ),
                ),
                message=(
                    f"planned {schedule.source} -> {mv.target} (score {mv.choice.score}) at "
                    f"{format_time(mv.not_before)}, notice at {format_time(mv.notice_at)}"
                    + (f" by {request.requested_by}" if request.requested_by else "")
                    + (f": {request.reason}" if request.reason else "")
                    + (f", bandwidth cap {request.bandwidth_mibps}MiB/s" if request.bandwidth_mibps else "")
                ),
            )
        )
    return out


#: How many droplet ids a refusal names before "and N more".
MAX_NAMED_DROPLETS = 10


def require_addresses(source: Host, droplets: Sequence[Droplet]) -> None:
    """Refuse to plan droplets whose guests could never be told: the metadata server knows a droplet only by
    its address, so one without an address gets no notice and its migration would wait in ``planned``
    forever. Hosts without a metadata server (no notices at all) are not checked."""
    if not source.metadata_url:
        return
    missing = [d.id for d in droplets if not d.addresses]
    if not missing:
        return
    named = ", ".join(missing[:MAX_NAMED_DROPLETS])
    if len(missing) > MAX_NAMED_DROPLETS:
        named += f" and {len(missing) - MAX_NAMED_DROPLETS} more"
    raise Conflict(
        f"{len(missing)} droplet(s) on {source.name} have no address, so their guests cannot be told of a "
        f"migration: {named}; give each one (host-engine droplet set ID --address IP, or inventory sync) "
        "and plan again"
    )


class _DryRun(Exception):
    def __init__(self, schedule: Schedule) -> None:
        super().__init__("dry run")
        self.schedule = schedule


def evacuate(
    store: Store, host_name: str, request: Request, config: EngineConfig, *, dry_run: bool = False
) -> tuple[Schedule, list[Migration]]:
    """Plan and (unless ``dry_run``) write the evacuation of ``host_name``, putting it in ``maintenance``.

    Droplets that already have an active migration are left alone (listed in ``Schedule.skipped``).
    """
    try:
        return _evacuate(store, host_name, request, config, dry_run=dry_run)
    except _DryRun as d:
        return d.schedule, []


def _evacuate(
    store: Store, host_name: str, request: Request, config: EngineConfig, *, dry_run: bool
) -> tuple[Schedule, list[Migration]]:
    with store.begin() as tx:
        validate_request(request, config.schedule, tx.now)
        tx.lock_planner()
        source = tx.get_host(host_name, for_update=True)
        droplets: list[Droplet] = []
        skipped: list[Droplet] = []
        busy = _migrating(tx, host_name)
        for d in tx.list_droplets(host=host_name):
            (skipped if d.id in busy else droplets).append(d)
        require_addresses(source, droplets)
        schedule = _schedule(tx, source, droplets, request, config)
        schedule = Schedule(schedule.source, schedule.plan, schedule.moves, tuple(d.id for d in skipped))
        if dry_run:
            raise _DryRun(schedule)
        tx.set_host_state(
            host_name, HostState.MAINTENANCE, reason=request.reason or "evacuation", by=request.requested_by
        )
        migrations = _write(tx, schedule, request, config)
    log.info(
        "host=%s evacuation planned: %d migrations from %s (requested_by=%s)",
        host_name,
        len(migrations),
        format_time(request.start),
        request.requested_by,
    )
    return schedule, migrations


def migrate_one(
    store: Store,
    droplet_id: str,
    request: Request,
    config: EngineConfig,
    *,
    to: str | None = None,
    dry_run: bool = False,
) -> tuple[Schedule, list[Migration]]:
    """Plan the move of one droplet (to ``to`` if given: it must still pass every filter)."""
    try:
        return _migrate_one(store, droplet_id, request, config, to=to, dry_run=dry_run)
    except _DryRun as d:
        return d.schedule, []


def _migrate_one(
    store: Store, droplet_id: str, request: Request, config: EngineConfig, *, to: str | None, dry_run: bool
) -> tuple[Schedule, list[Migration]]:
    with store.begin() as tx:
        validate_request(request, config.schedule, tx.now)
        tx.lock_planner()
        droplet = tx.get_droplet(droplet_id, for_update=True)
        if to is not None:
            tx.get_host(to)
            if to == droplet.host:
                raise InvalidInput(f"droplet {droplet_id} is already on {to}", field="to")
        busy = tx.active_migration_for(droplet_id)
        if busy is not None:
            raise Conflict(f"droplet {droplet_id} already has migration {busy.id} ({busy.state.value})")
        source = tx.get_host(droplet.host)
        require_addresses(source, [droplet])
        if to is not None:
            plan = plan_placement(
                tx, source, [droplet], config.placement, only_target=to, explain=[droplet_id]
            )
            [c] = plan.choices
            if c.target is None:
                why = next((v for v in c.verdicts or () if v.host == to), None)
                detail = f"{why.filter}: {why.reason}" if why is not None else "not a candidate"
                raise NoCapacity(f"host {to} cannot take droplet {droplet_id}: rejected by {detail}")
        schedule = _schedule(tx, source, [droplet], request, config, only_target=to)
        if dry_run:
            raise _DryRun(schedule)
        migrations = _write(tx, schedule, request, config)
    return schedule, migrations


def cancel(
    store: Store,
    *,
    migration_id: str | None = None,
    host: str | None = None,
    by: str = "",
    reason: str = "",
) -> list[Migration]:
    """Cancel one migration, or every cancellable migration out of ``host``. Returns the cancelled ones.

    A ``running`` migration cannot be cancelled here (it needs the executor's abort, which leaves the source
    running); asking to cancel one is a :class:`Conflict`.
    """
    if (migration_id is None) == (host is None):
        raise InvalidInput("give either a migration id or --host HOST")
    note = "cancelled" + (f" by {by}" if by else "") + (f": {reason}" if reason else "")
    with store.begin() as tx:
        if migration_id is not None:
            m = tx.get_migration(migration_id, for_update=True)
            if m.state not in CANCELLABLE:
                raise Conflict(
                    f"migration {migration_id} is {m.state.value}: "
                    + ("it is running; abort it instead" if m.state.is_active else "nothing to cancel")
                )
            return [tx.transition(migration_id, MigrationState.CANCELLED, message=note)]
        tx.get_host(host or "")
        todo = tx.list_migrations(states=CANCELLABLE, source_host=host)
        return [tx.transition(m.id, MigrationState.CANCELLED, message=note) for m in todo]
