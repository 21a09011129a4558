"""``host-engine host|droplet|inventory``: the hypervisors and droplets the engine knows."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any

import click

from host_engine import inventory
from host_engine.cli.app import (
    Deps,
    _droplet_doc,
    _host_doc,
    _json,
    _migration_doc,
    _nonneg,
    _table,
    cli,
    pass_deps,
)
from host_engine.errors import (
    InvalidInput,
)
from host_engine.models import Droplet, Host
from host_engine.states import ACTIVE_STATES, HostState
from host_engine.units import format_size, parse_size

log = logging.getLogger(__name__)


# ---- host ------------------------------------------------------------------------------------------------


@cli.group()
def host() -> None:
    """Hypervisors: add, list, show, set-state."""


@host.command("add")
@click.argument("name")
@click.option("--datacenter", required=True)
@click.option("--vcpus", type=int, required=True)
@click.option("--memory", required=True, help="e.g. 256GiB")
@click.option("--disk", required=True, help="e.g. 4TiB")
@click.option(
    "--compat-group", default="", help="CPU model / hypervisor version: live moves stay inside one."
)
@click.option("--uri", default="", help="libvirt URI of the hypervisor.")
@click.option("--metadata-url", default="", help="Admin URL of the metadata server serving its droplets.")
@click.option("--metadata-token-file", default="", help="File holding that server's admin bearer token.")
@click.option("--state", type=click.Choice([s.value for s in HostState]), default="active")
@pass_deps
def host_add(
    deps: Deps,
    name: str,
    datacenter: str,
    vcpus: int,
    memory: str,
    disk: str,
    compat_group: str,
    uri: str,
    metadata_url: str,
    metadata_token_file: str,
    state: str,
) -> None:
    """Add a hypervisor."""
    if not name.strip():
        raise InvalidInput("host name must not be empty", field="name")
    if metadata_url and not metadata_url.startswith(("http://", "https://")):
        raise InvalidInput(
            f"--metadata-url must be an http(s) URL, got {metadata_url!r}", field="metadata_url"
        )
    h = Host(
        name=name,
        datacenter=datacenter,
        vcpus=_nonneg(vcpus, "vcpus"),
        memory_bytes=parse_size(memory, field="--memory"),
        disk_bytes=parse_size(disk, field="--disk"),
        compat_group=compat_group,
        state=HostState(state),
        hypervisor_uri=uri,
        metadata_url=metadata_url,
        metadata_token_file=os.path.abspath(metadata_token_file) if metadata_token_file else "",
    )
    deps.store(create=True).add_host(h)
    click.echo(f"host {name} added ({datacenter}, {vcpus} vCPUs, {format_size(h.memory_bytes)}, "
               f"{format_size(h.disk_bytes)} disk)")  # fmt: skip


@host.command("list")
@click.option("--datacenter")
@click.option("--json", "as_json", is_flag=True)
@pass_deps
def host_list(deps: Deps, datacenter: str | None, as_json: bool) -> None:
    """List hypervisors with what is committed to them."""
    store = deps.store()
    with store.begin(readonly=True) as tx:
        hosts = tx.list_hosts(datacenter=datacenter)
        usage = tx.usage_by_host()
    if as_json:
        _json(
            [{**_host_doc(h), "committed": vars(usage[h.name]) if h.name in usage else None} for h in hosts]
        )
        return
    rows = []
    for h in hosts:
        u = usage.get(h.name)
        rows.append(
            [
                h.name,
                h.datacenter,
                h.state.value,
                h.compat_group or "-",
                f"{u.vcpus if u else 0}/{h.vcpus}",
                f"{format_size(u.memory_bytes if u else 0)}/{format_size(h.memory_bytes)}",
                f"{format_size(u.disk_bytes if u else 0)}/{format_size(h.disk_bytes)}",
                u.droplets if u else 0,
            ]
        )
    click.echo(_table(["HOST", "DC", "STATE", "GROUP", "VCPUS", "MEMORY", "DISK", "DROPLETS"], rows))


@host.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@pass_deps
def host_show(deps: Deps, name: str, as_json: bool) -> None:
    """One hypervisor, its droplets and its migrations."""
    store = deps.store()
    with store.begin(readonly=True) as tx:
        h = tx.get_host(name)
        droplets = tx.list_droplets(host=name)
        migrations = tx.list_migrations(host=name, states=ACTIVE_STATES)
    now = deps.clock()
    if as_json:
        _json(
            {
                **_host_doc(h),
                "droplets": [_droplet_doc(d) for d in droplets],
                "migrations": [_migration_doc(m, now) for m in migrations],
            }
        )
        return
    for key, value in _host_doc(h).items():
        shown = format_size(int(value)) if key in ("memory_bytes", "disk_bytes") else value
        click.echo(f"{key:20} {shown}")
    click.echo(f"{'droplets':20} {len(droplets)}: {', '.join(d.id for d in droplets) or '-'}")
    click.echo(f"{'active migrations':20} {len(migrations)}")


@host.command("set-state")
@click.argument("name")
@click.argument("state", type=click.Choice([s.value for s in HostState]))
@click.option("--reason", default="")
@click.option("--by", "by", default=None, help="Who asks (default: the login name).")
@pass_deps
def host_set_state(deps: Deps, name: str, state: str, reason: str, by: str | None) -> None:
    """Mark a hypervisor active, maintenance (nothing new lands on it) or down."""
    h = deps.store().set_host_state(name, HostState(state), reason=reason, by=deps.requested_by(by))
    click.echo(f"host {h.name} is {h.state.value}")


# ---- droplet ---------------------------------------------------------------------------------------------


@cli.group()
def droplet() -> None:
    """Droplets: add, set, list, show."""


@droplet.command("add")
@click.argument("droplet_id")
@click.option("--host", "host_name", required=True)
@click.option("--vcpus", type=int, required=True)
@click.option("--memory", required=True)
@click.option("--disk", required=True)
@click.option("--owner-tag", default="", help="Droplets with the same tag are kept on different hosts.")
@click.option("--address", "addresses", multiple=True, help="IPv4/IPv6 address the guest uses (repeat).")
@click.option("--hostname", default="")
@pass_deps
def droplet_add(
    deps: Deps,
    droplet_id: str,
    host_name: str,
    vcpus: int,
    memory: str,
    disk: str,
    owner_tag: str,
    addresses: tuple[str, ...],
    hostname: str,
) -> None:
    """Record a droplet running on a host."""
    d = Droplet(
        id=inventory.check_droplet_id(droplet_id),
        host=host_name,
        vcpus=_nonneg(vcpus, "vcpus"),
        memory_bytes=parse_size(memory, field="--memory"),
        disk_bytes=parse_size(disk, field="--disk"),
        owner_tag=owner_tag,
        addresses=_check_addresses(addresses),
        hostname=hostname,
    )
    deps.store().add_droplet(d)
    click.echo(f"droplet {droplet_id} added on {host_name}")


def _check_addresses(addresses: Iterable[str]) -> tuple[str, ...]:
    import ipaddress

    out = []
    for a in addresses:
        try:
            out.append(str(ipaddress.ip_address(a)))
        except ValueError as e:
            raise InvalidInput(f"--address {a!r} is not an IPv4 or IPv6 address", field="address") from e
    return tuple(out)


@droplet.command("set")
@click.argument("droplet_id")
@click.option("--owner-tag", default=None)
@click.option("--address", "addresses", multiple=True, help="Replaces the addresses (repeat).")
@click.option("--hostname", default=None)
@pass_deps
def droplet_set(
    deps: Deps, droplet_id: str, owner_tag: str | None, addresses: tuple[str, ...], hostname: str | None
) -> None:
    """Change a droplet's owner tag, addresses or hostname (its size comes from inventory sync)."""
    changes: dict[str, Any] = {}
    if owner_tag is not None:
        changes["owner_tag"] = owner_tag
    if addresses:
        changes["addresses"] = _check_addresses(addresses)
    if hostname is not None:
        changes["hostname"] = hostname
    if not changes:
        raise InvalidInput("nothing to change (--owner-tag, --address, --hostname)")
    with deps.store().begin() as tx:
        tx.update_droplet(droplet_id, **changes)
    click.echo(f"droplet {droplet_id} updated")


@droplet.command("list")
@click.option("--host", "host_name")
@click.option("--json", "as_json", is_flag=True)
@pass_deps
def droplet_list(deps: Deps, host_name: str | None, as_json: bool) -> None:
    """List droplets (on one host with --host)."""
    store = deps.store()
    if host_name is not None:
        store.get_host(host_name)
    droplets = store.list_droplets(host=host_name)
    if as_json:
        _json([_droplet_doc(d) for d in droplets])
        return
    rows = [
        [d.id, d.host, d.vcpus, format_size(d.memory_bytes), format_size(d.disk_bytes), d.owner_tag or "-",
         ",".join(d.addresses) or "-", d.power_state]
        for d in droplets
    ]  # fmt: skip
    click.echo(_table(["DROPLET", "HOST", "VCPUS", "MEMORY", "DISK", "OWNER", "ADDRESSES", "POWER"], rows))


@droplet.command("show")
@click.argument("droplet_id")
@click.option("--json", "as_json", is_flag=True)
@pass_deps
def droplet_show(deps: Deps, droplet_id: str, as_json: bool) -> None:
    """One droplet and its current migration."""
    store = deps.store()
    with store.begin(readonly=True) as tx:
        d = tx.get_droplet(droplet_id)
        m = tx.active_migration_for(droplet_id)
    doc = {**_droplet_doc(d), "migration": _migration_doc(m, deps.clock()) if m else None}
    if as_json:
        _json(doc)
        return
    for key, value in _droplet_doc(d).items():
        shown = format_size(int(value)) if key in ("memory_bytes", "disk_bytes") else value
        click.echo(f"{key:14} {shown}")
    click.echo(f"{'migration':14} " + (f"{m.id} {m.state.value} -> {m.target_host}" if m else "-"))


# ---- inventory -------------------------------------------------------------------------------------------


@cli.group("inventory")
def inventory_group() -> None:
    """Read what the hypervisors actually run."""


@inventory_group.command("sync")
@click.argument("host_name")
@click.option("--dry-run", is_flag=True, help="Report, change nothing.")
@click.option("--json", "as_json", is_flag=True)
@pass_deps
def inventory_sync(deps: Deps, host_name: str, dry_run: bool, as_json: bool) -> None:
    """Record the domains libvirt reports on HOST (through the host's --uri)."""
    report = inventory.sync_host(deps.store(), host_name, lister=deps.lister, dry_run=dry_run)
    if as_json:
        _json({**report.to_dict(), "dry_run": dry_run})
        return
    prefix = "would add" if dry_run else "added"
    click.echo(f"{host_name}: {prefix} {len(report.added)}, updated {len(report.updated)}, "
               f"unchanged {len(report.unchanged)}")  # fmt: skip
    for did in report.added:
        click.echo(f"  + {did}")
    for did in report.updated:
        click.echo(f"  ~ {did}")
    for did, where in report.elsewhere:
        click.echo(f"  ! {did}: libvirt shows it here, the store says it is on {where} (left alone)")
    for did in report.missing:
        click.echo(f"  ? {did}: in the store on {host_name}, not reported by libvirt (left alone)")
    for dom, why in report.skipped:
        click.echo(f"  - {dom}: skipped, {why}")
    _echo_addresses(report, dry_run)


def _echo_addresses(report: inventory.SyncReport, dry_run: bool) -> None:
    """What sync did and found about addresses, and one warning line per droplet that can spoof another."""
    verb = "would record" if dry_run else "recorded"
    for f in report.filled:
        click.echo(f"  @ {f.droplet}: {verb} address {', '.join(f.addresses)} (from libvirt's {f.source})")
    for d in report.differences:
        click.echo(f"  ! {d.droplet}: recorded address {', '.join(d.recorded)}, libvirt knows "
                   f"{', '.join(d.known)} ({d.source}); left as recorded")  # fmt: skip
    for c in report.conflicts:
        click.echo(f"  ! {c.droplet}: libvirt knows address {c.address}, already recorded for "
                   f"{c.recorded_for}; not recorded")  # fmt: skip
    for did in report.unaddressed:
        click.echo(f"  ! {did}: no address known, so it can never be notified (droplet set --address)")
    for source, error in report.source_errors:
        click.echo(f"  ? libvirt could not read {source} addresses: {error}")
    for g in report.spoofable:
        click.echo(f"  WARNING {g.droplet}: can send with another droplet's address: {'; '.join(g.problems)}")
    if not report.network_checked:
        click.echo("  (interfaces not read: addresses and anti-spoofing filters not checked)")
