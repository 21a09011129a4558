"""The ``metadata-server`` console script: it checks for the ``server`` extra before importing the CLI.

A base install (``pip install droplet-live-migration``) has ``metadata-server`` on the PATH without Flask or
gunicorn; there it says in one line to install ``droplet-live-migration[server]`` and exits 2 instead of a
traceback, and ``metadata-server --version`` answers either way (:mod:`guest_sdk.console_script`).
"""

from __future__ import annotations

from collections.abc import Sequence

from guest_sdk.console_script import Cli, ConsoleScript

PROG = "metadata-server"


def _load_cli() -> Cli:
    from metadata_server.cli import main as cli_main

    return lambda args: cli_main(args=args, prog_name=PROG)


SCRIPT = ConsoleScript(
    prog=PROG,
    extra="server",
    what="the metadata server",
    extra_modules=("flask", "gunicorn", "gevent", "prometheus_client"),
    package="metadata_server",
    load_cli=_load_cli,
)
EXTRA_MODULES = SCRIPT.extra_modules


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    SCRIPT.main(argv)
