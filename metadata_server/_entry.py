"""The ``metadata-server`` console script: it checks for the ``server`` extra before importing the CLI.

A droplet owner's ``pip install droplet-live-migration`` (the base install) puts
``metadata-server`` on the PATH too, without Flask or gunicorn; ``serve`` there died with a traceback
(``No module named 'flask'``). This module uses only the standard library until it knows the extra's modules
are importable: without them it says in one line which extra to install and exits 2.
``metadata-server --version`` answers either way.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

PROG = "metadata-server"
DISTRIBUTION = "droplet-live-migration"
EXTRA = "server"
#: Top-level modules from the extra (not the base install) that serving the API imports.
EXTRA_MODULES = ("flask", "gunicorn", "gevent", "prometheus_client")
#: A missing extra is a usage mistake (the CLI's exit code for a bad flag or value).
EXIT_MISSING_EXTRA = 2


def missing_modules(names: Sequence[str] = EXTRA_MODULES) -> list[str]:
    """Which of ``names`` cannot be imported here."""
    return [name for name in names if importlib.util.find_spec(name) is None]


def missing_extra_message(missing: Sequence[str]) -> str:
    """The one line a user sees without the extra."""
    return (
        f"{PROG}: error: the metadata server needs the '{EXTRA}' extra (no module {', '.join(missing)}): "
        f"pip install '{DISTRIBUTION}[{EXTRA}]'"
    )


def version_line() -> str:
    """What ``--version`` prints (the same words as click's version option)."""
    try:
        return f"{PROG}, version {version(DISTRIBUTION)}"
    except PackageNotFoundError:  # running from a source tree that was never installed
        return f"{PROG}, version unknown (not installed)"


def _refuse(missing: Sequence[str]) -> None:
    sys.stderr.write(missing_extra_message(missing) + "\n")
    sys.exit(EXIT_MISSING_EXTRA)


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    args = list(sys.argv[1:] if argv is None else argv)
    missing = missing_modules()
    if missing:
        if args == ["--version"]:
            print(version_line())
            return
        _refuse(missing)
    try:
        from metadata_server.cli import main as cli_main
    except ModuleNotFoundError as e:  # an extra module this list does not name yet
        if e.name is None or e.name.split(".")[0] in ("metadata_server", "__main__"):
            raise
        _refuse([e.name])
    cli_main(args=args, prog_name=PROG)
