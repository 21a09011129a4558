"""``host-engine demo`` (``make demo``): the whole demo from the command line, its output and exit code.

It exits 0 only if everything ended consistent (:meth:`Demo.verify`), 1 otherwise, 130 after Ctrl-C or
SIGTERM; every process it started is stopped on the way out in every case. The engine's own log lines go to
``engine.log`` in the working directory, not between the demo's lines.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import IO

import click

from guest_sdk.daemon_logging import TextFormatter
from host_engine.errors import HostEngineError
from host_engine.lab.demo.run import Demo
from host_engine.lab.demo.scenario import DEFAULT_TIMEOUT_S, DemoOptions


class _Terminated(Exception):
    pass


@contextlib.contextmanager
def _sigterm_as_exception() -> Iterator[None]:
    """SIGTERM ends the demo like Ctrl-C does: through ``finally``, so every child is stopped."""

    def handler(_signum: int, _frame: FrameType | None) -> None:
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _engine_log(demo: Demo) -> Iterator[None]:
    """The engine's own log lines go to engine.log in the working directory, not between the demo's lines."""
    root = logging.getLogger()
    handler = _DeferredFileHandler(demo)
    handler.setFormatter(TextFormatter())  # the daemons' text format, secrets redacted
    added = not root.handlers
    if added:
        root.addHandler(handler)
        root.setLevel(logging.INFO)
    try:
        yield
    finally:
        if added:
            root.removeHandler(handler)
        handler.close()


class _DeferredFileHandler(logging.Handler):
    """Writes to ``<workdir>/engine.log`` once the demo has a working directory (drops lines before)."""

    def __init__(self, demo: Demo) -> None:
        super().__init__()
        self.demo = demo
        self._file: IO[str] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self._file is None:
            if self.demo.workdir is None or not self.demo.workdir.exists():
                return
            self._file = (self.demo.workdir / "engine.log").open("a")
        self._file.write(self.format(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        super().close()


def run_demo(options: DemoOptions, echo: Callable[[str], None] = print) -> int:
    """The whole demo. 0 when everything ended consistent, 1 otherwise; 130 after Ctrl-C or SIGTERM."""
    started = time.monotonic()
    with _sigterm_as_exception(), Demo(options, echo) as demo, _engine_log(demo):
        try:
            demo.setup()
            demo.evacuate()
            demo.run()
            demo.print_table()
            problems = demo.verify()
        except (KeyboardInterrupt, _Terminated):
            echo("interrupted: stopping every process the demo started")
            return 130
        except HostEngineError as e:
            echo(f"host-engine demo: error: {e}")
            return 1
        elapsed = time.monotonic() - started
        if problems:
            echo(f"NOT consistent after {elapsed:.1f} s:")
            for p in problems:
                echo(f"  - {p}")
            return 1
        echo(
            f"consistent after {elapsed:.1f} s: every droplet on exactly one host (store = simulator), "
            "no event left on the metadata server, every hook ran exactly once"
        )
        echo("on real hypervisors it is configuration, not code (docs/host-engine.md):")
        echo(
            "  host-engine host add HOST ... --uri qemu+ssh://HOST/system --metadata-url https://HOST.mgmt:8775"
        )
        echo("  host-engine evacuate HOST --start +15m && host-engine run --driver libvirt")
        if options.keep and demo.workdir is not None:
            echo(f"files kept in {demo.workdir}")
        return 0


@click.command("demo")
@click.option("--keep", is_flag=True, help="Keep the working directory (store, logs, journals).")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option("--timeout", "timeout_s", type=float, default=DEFAULT_TIMEOUT_S, show_default=True)
def demo(keep: bool, workdir: Path | None, timeout_s: float) -> None:
    """A datacenter on one machine: evacuate a host with notice, agents, the sim hypervisor (about 30 s)."""
    options = DemoOptions(workdir=workdir, keep=keep or workdir is not None, timeout_s=timeout_s)
    code = run_demo(options, echo=click.echo)
    sys.exit(code)
