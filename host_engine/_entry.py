"""The ``host-engine`` console script: it checks for the ``host`` extra before importing the CLI.

A base install (``pip install droplet-live-migration``) has ``host-engine`` on the PATH without SQLAlchemy;
there it says in one line to install ``droplet-live-migration[host]`` and exits 2 instead of a traceback, and
``host-engine --version`` answers either way (:mod:`guest_sdk.console_script`).
"""

from __future__ import annotations

from collections.abc import Sequence

from guest_sdk.console_script import Cli, ConsoleScript


def _load_cli() -> Cli:
    from host_engine.cli import main as cli_main

    return cli_main


SCRIPT = ConsoleScript(
    prog="host-engine",
    extra="host",
    what="the host engine",
    extra_modules=("sqlalchemy", "prometheus_client"),
    package="host_engine",
    load_cli=_load_cli,
)
PROG = SCRIPT.prog
EXTRA_MODULES = SCRIPT.extra_modules


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    SCRIPT.main(argv)
