"""``metadata-server``: run the per-hypervisor metadata server."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import click

from guest_sdk.daemon_logging import LogFormat, error_line, log_format_option, setup_logging

from .config import (
    DEFAULT_ADMIN_LISTEN,
    DEFAULT_DB,
    DEFAULT_GUEST_LISTEN,
    TOKEN_ENV,
    build_config,
    load_token,
)
from .errors import MetadataServerError
from .service_unit import (
    DEFAULT_TOKEN_SOURCE,
    DEFAULT_UNIT_DIR,
    UNIT_NAME,
    UnitSettings,
    render,
    server_executable,
    write,
)

log = logging.getLogger("metadata_server")


class _OneLineErrors(click.Group):
    """Every mistake a user can make is one line on stderr and an exit code, never a usage dump."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MetadataServerError as e:
            click.echo(error_line(f"metadata-server: error: {e}", "metadata_server"), err=True)
            ctx.exit(e.exit_code)
        except click.UsageError as e:
            click.echo(f"metadata-server: error: {e.format_message()}", err=True)
            ctx.exit(2)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as e:
            click.echo(f"metadata-server: error: {e.format_message()}", err=True)
            ctx.exit(2)


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="droplet-live-migration", prog_name="metadata-server")
def main() -> None:
    """The metadata server droplets ask about maintenance (curl http://169.254.169.254/v1/maintenance_event).

    It serves two listeners: the guest listener, where each droplet is identified by its TCP source address
    and reads its own maintenance event; and the authenticated admin listener, through which the host engine
    registers droplets and sets or clears their events.
    """


@main.command()
@click.option(
    "--guest-listen",
    default=DEFAULT_GUEST_LISTEN,
    show_default=True,
    metavar="HOST:PORT",
    help="Address the droplets reach (the link-local metadata address in production).",
)
@click.option(
    "--admin-listen",
    default=DEFAULT_ADMIN_LISTEN,
    show_default=True,
    metavar="HOST:PORT",
    help="Address of the admin API. A non-loopback address needs TLS or --insecure-admin.",
)
@click.option(
    "--db",
    "db",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_DB,
    show_default=True,
    help="State file (SQLite). Every acknowledged admin change is in it before the answer.",
)
@click.option(
    "--admin-token-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help=f"File holding the admin bearer token (mode 600). Default: the {TOKEN_ENV} variable.",
)
@click.option(
    "--admin-tls-cert",
    type=click.Path(dir_okay=False, path_type=Path),
    help="PEM certificate for the admin listener.",
)
@click.option(
    "--admin-tls-key",
    type=click.Path(dir_okay=False, path_type=Path),
    help="PEM private key for the admin listener.",
)
@click.option("--insecure-admin", is_flag=True, help="Allow a non-loopback admin listener without TLS.")
@click.option("--workers", type=int, default=2, show_default=True, help="Guest listener worker processes.")
@click.option(
    "--max-waits-per-droplet",
    type=int,
    default=8,
    show_default=True,
    help="Long-polls one droplet may hold at once, per worker process (more get 429).",
)
@click.option(
    "--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info", show_default=True
)
@log_format_option(envvar="METADATA_SERVER_LOG_FORMAT")
def serve(
    guest_listen: str,
    admin_listen: str,
    db: Path,
    admin_token_file: Path | None,
    admin_tls_cert: Path | None,
    admin_tls_key: Path | None,
    insecure_admin: bool,
    workers: int,
    max_waits_per_droplet: int,
    log_level: str,
    log_format: LogFormat,
) -> None:
    """Serve the guest and admin listeners until SIGTERM or SIGINT."""
    setup_logging(log_format, log_level)  # before the fork: gunicorn's arbiters and workers inherit it
    config = build_config(
        guest_listen=guest_listen,
        admin_listen=admin_listen,
        db=db,
        token=load_token(admin_token_file),
        tls_cert=admin_tls_cert,
        tls_key=admin_tls_key,
        insecure_admin=insecure_admin,
        workers=workers,
        max_waits_per_droplet=max_waits_per_droplet,
        log_level=log_level,
    )
    # Open (and create or upgrade) the state file now, so a bad --db is one clear error.
    from .store import Store

    Store(config.db_path).close()
    from .serving import serve as run

    code = run(config, lambda line: log.info("%s", line.removeprefix("metadata-server: ")))
    sys.exit(code)


@main.command("install-unit")
@click.option("--guest-listen", default=DEFAULT_GUEST_LISTEN, show_default=True, metavar="HOST:PORT")
@click.option("--admin-listen", default=DEFAULT_ADMIN_LISTEN, show_default=True, metavar="HOST:PORT")
@click.option(
    "--db", "db", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_DB, show_default=True
)
@click.option(
    "--admin-token-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_TOKEN_SOURCE,
    show_default=True,
    help="Where the token lies on this host; systemd hands it to the service as a credential.",
)
@click.option("--admin-tls-cert", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--admin-tls-key", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--insecure-admin", is_flag=True, help="Allow a non-loopback admin listener without TLS.")
@click.option("--workers", type=int, default=2, show_default=True)
@click.option(
    "--dest",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_UNIT_DIR,
    show_default=True,
    help=f"Directory to write {UNIT_NAME} into.",
)
@click.option("--force", is_flag=True, help="Overwrite an existing unit file.")
def install_unit(
    guest_listen: str,
    admin_listen: str,
    db: Path,
    admin_token_file: Path,
    admin_tls_cert: Path | None,
    admin_tls_key: Path | None,
    insecure_admin: bool,
    workers: int,
    dest: Path,
    force: bool,
) -> None:
    """Write a hardened systemd unit that runs `serve` with these flags (checked now, as `serve` would)."""
    settings = UnitSettings(
        executable=server_executable(),
        guest_listen=guest_listen,
        admin_listen=admin_listen,
        db=db,
        token_file=admin_token_file,
        tls_cert=admin_tls_cert,
        tls_key=admin_tls_key,
        insecure_admin=insecure_admin,
        workers=workers,
    )
    target = write(render(settings), dest, force=force)
    click.echo(f"wrote {target}")
    click.echo("next: systemctl daemon-reload && systemctl enable --now metadata-server")
