"""``host-engine install-unit``: write the hardened systemd unit for ``host-engine run``."""

from __future__ import annotations

from pathlib import Path

import click

from host_engine.cli.app import cli
from host_engine.service_unit import (
    DEFAULT_CONFIG,
    DEFAULT_UNIT_DIR,
    UNIT_NAME,
    UnitSettings,
    engine_executable,
    render,
    write,
)


@cli.command("install-unit")
@click.option(
    "--engine-config",
    "engine_config",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_CONFIG,
    show_default=True,
    help="The TOML config the service runs with (its `db`, limits, metadata servers).",
)
@click.option("--worker", default=None, metavar="NAME", help="Worker name (default: the hostname).")
@click.option("--metrics-listen", default=None, metavar="HOST:PORT", help="Serve Prometheus metrics there.")
@click.option(
    "--user", default=None, metavar="NAME", help="Run as this user (default: root, no capabilities)."
)
@click.option(
    "--dest",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_UNIT_DIR,
    show_default=True,
    help=f"Directory to write {UNIT_NAME} into.",
)
@click.option("--force", is_flag=True, help="Overwrite an existing unit file.")
def install_unit(
    engine_config: Path,
    worker: str | None,
    metrics_listen: str | None,
    user: str | None,
    dest: Path,
    force: bool,
) -> None:
    """Write a hardened systemd unit that runs `host-engine run` with this config."""
    settings = UnitSettings(
        executable=engine_executable(),
        config=engine_config,
        worker=worker,
        metrics_listen=metrics_listen,
        user=user,
    )
    target = write(render(settings), dest, force=force)
    click.echo(f"wrote {target}")
    click.echo("next: systemctl daemon-reload && systemctl enable --now host-engine")
