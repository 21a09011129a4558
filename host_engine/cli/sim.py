"""``host-engine sim calibrate``: fit the simulator to the fleet's own real migrations.

It reads, for every finished migration between hypervisors that are not simulated, the progress entries the
executor logged and the attempt's numbers, fits ``[sim]`` (``host_engine.calibration.calibrate``) and prints
it as a TOML section to paste into the config (or ``--json``). Nothing is written.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import click

from host_engine.calibration import Calibration, RecordedRun, calibrate
from host_engine.cli.app import Deps, _json, cli, pass_deps
from host_engine.errors import InvalidInput
from host_engine.inventory import DriverKind, driver_kind
from host_engine.models import LogEntry, Migration
from host_engine.states import LogKind, MigrationState

LAST_ATTEMPT_KEY = "last_attempt"
MiB = 1024 * 1024


def _sample(entry: LogEntry) -> dict[str, Any]:
    """A logged progress entry as a calibration sample (the log keeps what is left, not what was sent)."""
    d = dict(entry.data)
    disk_sent = max(0, int(d.get("disk_total_bytes") or 0) - int(d.get("disk_remaining_bytes") or 0))
    d["t"] = float(d.get("elapsed_s") or 0.0)
    d["disk_processed_bytes"] = disk_sent
    d["memory_processed_bytes"] = max(0, int(d.get("bytes_transferred") or 0) - disk_sent)
    return d


def recorded_run(m: Migration, log: list[LogEntry], cap_mibps: int) -> RecordedRun | None:
    """One finished migration as calibration input; None when it has nothing to learn from."""
    last: Mapping[str, Any] = m.stats.get(LAST_ATTEMPT_KEY) or {}
    samples = tuple(_sample(e) for e in log if e.kind == LogKind.PROGRESS and e.data)
    if not last or not samples or last.get("duration_s") is None:
        return None
    first = samples[0]
    return RecordedRun(
        droplet_id=m.droplet_id,
        memory_bytes=int(first.get("memory_total_bytes") or 0),
        disk_bytes=int(first.get("disk_total_bytes") or 0),
        cap_mibps=cap_mibps,
        converged=m.state is MigrationState.COMPLETED,
        duration_s=float(last["duration_s"]),
        downtime_ms=None if last.get("downtime_ms") is None else float(last["downtime_ms"]),
        bytes_transferred=int(last.get("bytes_transferred") or 0),
        samples=samples,
    )


def as_toml(cal: Calibration) -> str:
    lines = [
        "[sim]",
        f"link_mibps = {cal.link_bps / MiB:.1f}",
        *([] if cal.host.mirror_bps is None else [f"mirror_mibps = {cal.host.mirror_bps / MiB:.1f}"]),
        f"setup_s = {cal.host.setup_s:.2f}",
        f"switchover_ms = {cal.host.switchover_ms:.0f}",
        f"sync_disk_writes = {'true' if cal.host.sync_disk_writes else 'false'}",
    ]
    for droplet_id, w in sorted(cal.workloads.items()):
        lines += [
            "",
            f'[sim.droplets."{droplet_id}"]',
            f"memory_rate_mibps = {w.memory_rate_bps / MiB:.2f}",
            f"memory_hot_mib = {w.memory_hot_bytes / MiB:.2f}",
            f"disk_rate_mibps = {w.disk_rate_bps / MiB:.2f}",
            f"disk_hot_mib = {w.disk_hot_bytes / MiB:.2f}",
            f'memory_pattern = "{w.memory_pattern.value}"',
            f'disk_pattern = "{w.disk_pattern.value}"',
        ]
        if w.memory_resident_bytes is not None:
            lines.append(f"memory_resident_mib = {w.memory_resident_bytes / MiB:.2f}")
        if w.disk_allocated_bytes is not None:
            lines.append(f"disk_allocated_mib = {w.disk_allocated_bytes / MiB:.2f}")
    return "\n".join(lines)


@cli.group("sim")
def sim_group() -> None:
    """The simulator behind predictions: calibrate it from real migrations."""


@sim_group.command("calibrate")
@click.option("--json", "as_json", is_flag=True)
@click.option(
    "--cap-mibps",
    type=click.IntRange(0, 1 << 20),
    default=None,
    help="The bandwidth cap those migrations ran with (default: [libvirt] bandwidth_mibps).",
)
@click.option(
    "--sync-writes/--no-sync-writes",
    "sync_writes",
    default=None,
    help="Whether those migrations used the write-blocking disk mirror, whose bytes count the guest's own "
    "writes (default: [libvirt] sync_disk_writes, on unless set off); the fit simulates the same mirror.",
)
@pass_deps
def calibrate_cmd(deps: Deps, as_json: bool, cap_mibps: int | None, sync_writes: bool | None) -> None:
    """Fit [sim] (link, fixed costs, per-droplet workloads) from the store's records of real migrations."""
    cap = deps.config.libvirt.bandwidth_mibps if cap_mibps is None else cap_mibps
    sync = deps.config.libvirt.sync_disk_writes if sync_writes is None else sync_writes
    runs: list[RecordedRun] = []
    with deps.store().begin(readonly=True) as tx:
        simulated = {
            h.name for h in tx.list_hosts() if driver_kind(h.hypervisor_uri) is not DriverKind.LIBVIRT
        }
        done = tx.list_migrations(states=[MigrationState.COMPLETED, MigrationState.FAILED])
        for m in done:
            if m.source_host in simulated or m.target_host in simulated:
                continue  # the sim learns nothing from itself
            run = recorded_run(m, tx.migration_log(m.id), cap)
            if run is not None:
                runs.append(run)
    if not runs:
        raise InvalidInput(
            "no finished migration between real hypervisors with progress samples to learn from"
        )
    cal = calibrate(runs, sync_disk_writes=sync)
    if as_json:
        _json({**cal.to_dict(), "runs": len(runs)})
    else:
        click.echo(f"# fitted from {len(runs)} migration(s); paste into the config file")
        click.echo(as_toml(cal))
