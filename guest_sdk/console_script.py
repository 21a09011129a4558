"""A console script that checks for its package's extra before importing its CLI.

A droplet owner's ``pip install droplet-live-migration`` (the base install) puts ``host-engine`` and
``metadata-server`` on the PATH too, without the ``host`` or ``server`` extra (SQLAlchemy, Flask, gunicorn).
Importing their CLIs there dies with a traceback (``No module named 'sqlalchemy'``), so their entry points
(``host_engine._entry``, ``metadata_server._entry``) are a :class:`ConsoleScript` each: it uses only the
standard library until it knows the extra's modules are importable; without them it says in one line which
extra to install and exits 2. ``--version`` answers either way.

It lives in the guest SDK because that is the one package every install has, and the engine and the server
already share their daemon helpers from here (``guest_sdk.daemon_logging``).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

DISTRIBUTION = "droplet-live-migration"
#: A missing extra is a usage mistake (the CLIs' exit code for a bad flag or value).
EXIT_MISSING_EXTRA = 2

#: Runs the CLI on the command-line arguments (without the program name).
Cli = Callable[[list[str]], None]


@dataclass(frozen=True)
class ConsoleScript:
    """One console script gated on one extra.

    >>> script = ConsoleScript("demo", "extra", "the demo", ("m",), "demo", load_cli=lambda: print)
    >>> script.missing_extra_message(["m"])
    "demo: error: the demo needs the 'extra' extra (no module m): pip install 'droplet-live-migration[extra]'"
    """

    #: The command's name, as the user types it (``host-engine``).
    prog: str
    #: The optional-dependencies group in pyproject.toml that the CLI needs.
    extra: str
    #: What needs the extra, in the error line (``the host engine``).
    what: str
    #: Top-level modules from the extra (not the base install) that the CLI imports when it starts.
    extra_modules: tuple[str, ...]
    #: The script's own top-level package: a module of it missing is a bug, never a missing extra.
    package: str
    #: Imports the CLI (only called once the extra's modules were found) and returns it.
    load_cli: Callable[[], Cli]

    def missing_modules(self) -> list[str]:
        """Which of the extra's modules cannot be imported here."""
        return [name for name in self.extra_modules if importlib.util.find_spec(name) is None]

    def missing_extra_message(self, missing: Sequence[str]) -> str:
        """The one line a user sees without the extra."""
        return (
            f"{self.prog}: error: {self.what} needs the '{self.extra}' extra "
            f"(no module {', '.join(missing)}): pip install '{DISTRIBUTION}[{self.extra}]'"
        )

    def version_line(self) -> str:
        """What ``--version`` prints (the same words as click's version option)."""
        try:
            return f"{self.prog}, version {version(DISTRIBUTION)}"
        except PackageNotFoundError:  # running from a source tree that was never installed
            return f"{self.prog}, version unknown (not installed)"

    def _refuse(self, missing: Sequence[str]) -> None:
        sys.stderr.write(self.missing_extra_message(missing) + "\n")
        sys.exit(EXIT_MISSING_EXTRA)

    def main(self, argv: Sequence[str] | None = None) -> None:
        """Run the CLI on ``argv`` (default: ``sys.argv[1:]``), or say which extra is missing and exit 2."""
        args = list(sys.argv[1:] if argv is None else argv)
        missing = self.missing_modules()
        if missing:
            if args == ["--version"]:
                print(self.version_line())
                return
            self._refuse(missing)
        try:
            cli = self.load_cli()
        except ModuleNotFoundError as e:  # an extra module extra_modules does not name yet
            if e.name is None or e.name.split(".")[0] in (self.package, "__main__"):
                raise
            self._refuse([e.name])
        cli(args)
